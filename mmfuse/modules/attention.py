"""The one attention implementation (PyTorch SDPA) used by every mmfuse block."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when context is None).

    Args:
        dim: width of the queries and of the output.
        num_heads: number of heads; must divide ``dim``.
        context_dim: width of the context (defaults to ``dim``).
        dropout: attention dropout in training.

    Attributes:
        recorder: None (the default: fused SDPA, no weights materialised), or, set on an
            instance only inside ``mmfuse.attention_maps.capture_attention``, a callable that
            receives the explicit softmax weights (B, h, L, S) of every call.
    """

    recorder: Callable[[torch.Tensor], None] | None = None

    def __init__(
        self, dim: int, num_heads: int, context_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context (B, S, Dc) -> two (B, h, S, d).

        Computed once, they can be passed to ``forward(kv=...)`` for any number of queries
        (a decoder's cross-attention over a fixed memory during generation).
        """
        b, dim = context.shape[0], self.to_q.out_features
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.reshape(b, -1, self.num_heads, dim // self.num_heads).transpose(1, 2)  # (B, h, S, d)
        v = v.reshape(b, -1, self.num_heads, dim // self.num_heads).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attends.

        Args:
            x: (B, L, D) queries.
            context: (B, S, Dc) keys and values; ``x`` itself when None.
            mask: (B, S) bool, True where a context token may be attended to.
            kv: keys and values already projected by ``project_context`` (``context`` is then
                not used).

        Returns:
            (B, L, D).
        """
        b, length, dim = x.shape
        q = self.to_q(x).view(b, length, self.num_heads, -1).transpose(1, 2)  # (B, h, L, d)
        k, v = kv if kv is not None else self.project_context(x if context is None else context)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
        dropout = self.dropout if self.training else 0.0
        if self.recorder is not None:  # the same attention, with the weights written out
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, L, S)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            self.recorder(weights.detach())
            out = F.dropout(weights, dropout) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.to_out(out.transpose(1, 2).reshape(b, length, dim))


class FeedForward(nn.Sequential):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        hidden = int(dim * mlp_ratio)
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
