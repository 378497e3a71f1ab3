"""Concatenation fusion (the LLaVA baseline): projected media tokens side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmfuse.modules.attention import FeedForward
from mmfuse.modules.fusion import PROMPT, check_modalities, media_order, null_entry, null_token
from mmfuse.types import Memory, ModalityTokens


class ConcatFusion(nn.Module):
    """An MLP projector per media modality; the memory is all their tokens, concatenated.

    Memory layout, M = 1 + sum of N_m: ``[null token; image tokens; audio tokens]`` (a fixed
    order whatever the order of ``modalities``), with the modalities' own masks. The learned
    null token comes first and is always valid, so a record without media keeps one
    attendable position. Masked-out tokens are zero in the memory (and their features never
    reach the projector).

    There is no prompt conditioning: the decoder reads the prompt itself. A ``text``
    modality is refused, since a prompt encoder whose output nothing reads would get no
    gradient (DDP runs without an unused-parameter search): compose without ``model/text``.

    Args:
        modalities: the media modality names this fusion receives, in any order.
        d_model: width of tokens and memory.
        mlp_ratio: hidden width of each Linear-GELU-Linear projector over ``d_model``
            (LLaVA-1.5: 1).
        dropout: dropout in the projectors.
        num_queries, num_layers, num_heads: unused; accepted so that size presets written for
            the query-based fusions (``conf/model/tiny.yaml``) compose with this one too.
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
    ) -> None:
        super().__init__()
        if PROMPT in modalities:
            raise ValueError(
                "model.fusion: ConcatFusion does not read the prompt, so a prompt encoder "
                "would get no gradient; remove it (model/text=null) or use another fusion"
            )
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
        for name in self.media:
            media = tokens[name]
            drop = ~media.mask[..., None]  # (B, N, 1)
            projected = self.projectors[name](media.feats.masked_fill(drop, 0.0))  # (B, N, D)
            feats.append(projected.masked_fill(drop, 0.0))
            masks.append(media.mask)
        return Memory(torch.cat(feats, dim=1), torch.cat(masks, dim=1))
