"""A bag-of-words prompt encoder: one learned vector per vocabulary entry, no context.

With ``CrossAttentionFusion(prompt="add")`` the sum of a prompt's word vectors is added to
every fusion query, so each query starts out knowing the question ("the *red* one", "what
*shape*") before it looks at the media. On the built-in world's lookup set ("What shape is
the {colour} one?") this is what lets a model find the shape a question names: queries that
only attend to contextual prompt tokens plateau at the score of a model that cannot bind
(README, "What the demo gives").
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from mmfuse.types import ModalityTokens


class BagOfWordsEncoder(nn.Module):
    """Prompt ids -> one independent learned vector per token (no positions, no attention).

    Args:
        tokenizer: the decoder's tokenizer (the encoder reads the same ids).
        d_model: fusion width.
        init_std: standard deviation of the initial word vectors: large, so that distinct
            questions start far apart. Summed into the fusion queries, the sum should be
            about the size of the queries (``CrossAttentionFusion(query_std=...)``); the demo
            uses 0.35 with queries at 1.0.
        vocab_size: embedding rows when they differ from ``len(tokenizer)``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        d_model: int,
        init_std: float = 1.0,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size or len(tokenizer), d_model)
        nn.init.normal_(self.embed.weight, std=init_std)
        # every mmfuse encoder ends in ``proj`` (freezing presets and the model's width check
        # rely on it); it starts as the identity so the word vectors keep their scale
        self.proj = nn.Linear(d_model, d_model)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> ModalityTokens:
        """ids (B, P), mask (B, P) -> tokens (B, P, D) (zero where padded), mask (B, P) bool."""
        keep = mask.bool()
        feats = self.proj(self.embed(ids)) * keep[..., None]  # (B, P, D)
        return ModalityTokens(feats, keep)
