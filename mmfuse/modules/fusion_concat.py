"""Concatenation fusion (the LLaVA baseline): projected media tokens side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmfuse.modules.attention import FeedForward
from mmfuse.modules.fusion import (
    PROMPT,
    check_modalities,
    media_order,
    null_entry,
    null_token,
    prompt_sum,
)
from mmfuse.types import Memory, ModalityTokens


class ConcatFusion(nn.Module):
    """An MLP projector per media modality; the memory is all their tokens, concatenated.

    Memory layout, M = 1 + sum of N_m: ``[null token; image tokens; audio tokens]`` (a fixed
    order whatever the order of ``modalities``), with the modalities' own masks. The learned
    null token comes first and is always valid, so a record without media keeps one
    attendable position. Masked-out tokens are zero in the memory (and their features never
    reach the projector).

    Without a prompt encoder, as in LLaVA, the decoder alone reads the prompt. With one (a
    ``text`` modality, e.g. ``model/text=bag_of_words``) the projectors are
    instruction-aware: the sum of the prompt's tokens is added to every media token before
    its projector, so each projected token can say whether it is what the question asks
    for ("the red one"). The prompt tokens themselves are not put in the memory.

    Args:
        modalities: the modality names this fusion receives, in any order (media, and
            ``text`` for an instruction-aware projector).
        d_model: width of tokens and memory.
        mlp_ratio: hidden width of each Linear-GELU-Linear projector over ``d_model``
            (LLaVA-1.5: 1).
        dropout: dropout in the projectors.
        prompt: how a prompt is read: ``add`` (the only way, above); accepted so that
            settings written for every fusion (``experiment=world_sweep``) compose.
        num_queries, num_layers, num_heads, query_std: unused; accepted so that size presets
            written for the query-based fusions (``conf/model/tiny.yaml``) compose too.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        d_model: int,
        mlp_ratio: float = 1.0,
        dropout: float = 0.0,
        num_queries: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        prompt: str = "add",
        query_std: float | None = None,
    ) -> None:
        super().__init__()
        if prompt != "add":
            raise ValueError(f"fusion.prompt: ConcatFusion reads a prompt as 'add', not {prompt!r}")
        self.modalities = tuple(modalities)
        self.media = media_order(self.modalities)
        self.projectors = nn.ModuleDict(
            {m: FeedForward(d_model, mlp_ratio, dropout) for m in self.media}
        )
        self.null_token = null_token(d_model)

    def forward(self, tokens: Mapping[str, ModalityTokens]) -> Memory:
        """tokens: {modality: (B, N_m, D) + mask} -> Memory (B, 1 + sum N_m, D), mask."""
        batch = check_modalities(tokens, self.modalities)
        null_feats, null_mask = null_entry(self.null_token, batch)
        feats, masks = [null_feats], [null_mask]
        question = None
        if PROMPT in tokens:
            question = prompt_sum(tokens[PROMPT].feats, tokens[PROMPT].mask)  # (B, 1, D)
        for name in self.media:
            media = tokens[name]
            drop = ~media.mask[..., None]  # (B, N, 1)
            inputs = media.feats if question is None else media.feats + question
            projected = self.projectors[name](inputs.masked_fill(drop, 0.0))  # (B, N, D)
            feats.append(projected.masked_fill(drop, 0.0))
            masks.append(media.mask)
        return Memory(torch.cat(feats, dim=1), torch.cat(masks, dim=1))
