"""Decoder conditioning: how the fused memory enters the language model."""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.types import Memory


class PrefixConditioning(nn.Module):
    """Projects memory tokens to the decoder width; they are placed before the text tokens.

    Args:
        d_model: memory width.
        lm_hidden: the decoder's hidden size.
    """

    def __init__(self, d_model: int, lm_hidden: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, lm_hidden))

    def forward(self, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory (B, M, D) -> prefix embeddings (B, M, H) and their mask (B, M)."""
        return self.proj(memory.feats), memory.mask.long()
