"""Perceiver resampler fusion (Flamingo): learned latents per media modality."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmfuse.modules.attention import Attention, FeedForward
from mmfuse.modules.fusion import (
    PROMPT,
    check_modalities,
    media_order,
    null_entry,
    null_token,
    prompt_sum,
)
from mmfuse.types import Memory, ModalityTokens


class PerceiverLayer(nn.Module):
    """Pre-norm Perceiver layer: latents attend to [media tokens; latents], then an MLP.

    The latents are always among the keys, so a record without this modality (all media
    tokens masked) still attends to something.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio, dropout)

    def forward(
        self, latents: torch.Tensor, media: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """latents (B, L, D), media (B, N, D) + mask (B, N) -> latents (B, L, D)."""
        h = self.norm_latents(latents)
        ctx = torch.cat([self.norm_media(media), h], dim=1)  # (B, N+L, D)
        keep = torch.cat([mask, torch.ones_like(h[..., 0], dtype=torch.bool)], dim=1)
        latents = latents + self.attn(h, ctx, keep)
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    """One modality's variable number of tokens -> a fixed number of latents.

    The learned latents are called ``queries`` like every fusion's learned queries (the
    optimiser keeps parameters of that name out of weight decay).

    Args:
        d_model: token width.
        num_latents: output length L.
        num_layers: Perceiver layers.
        num_heads: attention heads.
        mlp_ratio: MLP width over ``d_model``.
        dropout: dropout in attention and MLPs.
        query_std: standard deviation of the initial latents.
    """

    def __init__(
        self,
        d_model: int,
        num_latents: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        query_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_latents, d_model) * query_std)
        self.layers = nn.ModuleList(
            PerceiverLayer(d_model, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, media: torch.Tensor, mask: torch.Tensor, start: torch.Tensor | None = None
    ) -> torch.Tensor:
        """media (B, N, D) + mask (B, N) -> latents (B, L, D); ``start`` (B, 1, D), if given,
        is added to every latent before the first layer."""
        latents = self.queries.expand(media.shape[0], -1, -1)
        if start is not None:
            latents = latents + start
        for layer in self.layers:
            latents = layer(latents, media, mask)
        return self.norm(latents)


PERCEIVER_PROMPT_MODES = ("memory", "add", "both")
"""How ``PerceiverFusion`` uses the prompt: its tokens are appended to the ``memory``, their
sum is added to every latent (``add``), or both."""


class PerceiverFusion(nn.Module):
    """A Perceiver resampler per media modality; the memory is their latents side by side.

    Memory layout, M = 1 + L * (number of media modalities) [+ P]:
    ``[null token; image latents; audio latents; (prompt tokens)]``. The null token is always
    valid (a record without media keeps one attendable position); a modality's latents are
    valid for the records that have at least one token of it and masked out for the others.
    Masked-out positions are zero in the memory.

    The prompt (a ``text`` modality) is not resampled. With ``prompt="memory"`` the
    resamplers are prompt-agnostic, as in Flamingo: its encoded tokens are appended to the
    memory with the prompt mask, so the decoder reads the text encoder's features (and the
    text encoder trains, every step). With ``prompt="add"`` the sum of its tokens is added to
    every latent of every resampler before the first layer, so the latents look for what the
    question names (as ``CrossAttentionFusion`` does for ``BagOfWordsEncoder`` tokens), and
    nothing is appended; ``both`` does both.

    Args:
        modalities: the modality names this fusion receives, in any order; media come out in
            the fixed order image, audio.
        d_model: width of tokens and memory.
        num_queries: learned latents L per media modality (the name every fusion's query
            count shares, so size presets apply to all of them).
        num_layers: Perceiver layers per resampler.
        num_heads: attention heads.
        mlp_ratio: MLP width over ``d_model``.
        dropout: dropout in attention and MLPs.
        prompt: ``memory``, ``add`` or ``both`` (``PERCEIVER_PROMPT_MODES``, above); used only
            with a ``text`` modality.
        query_std: standard deviation of the initial latents (with ``add``, about the size of
            the prompt sum: see ``CrossAttentionFusion``).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        d_model: int,
        num_queries: int = 16,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        prompt: str = "memory",
        query_std: float = 0.02,
    ) -> None:
        super().__init__()
        if prompt not in PERCEIVER_PROMPT_MODES:
            raise ValueError(f"fusion.prompt: {prompt!r} is not one of {PERCEIVER_PROMPT_MODES}")
        self.prompt_mode = prompt
        self.modalities = tuple(modalities)
        self.media = media_order(self.modalities)
        self.resamplers = nn.ModuleDict(
            {
                m: PerceiverResampler(
                    d_model, num_queries, num_layers, num_heads, mlp_ratio, dropout, query_std
                )
                for m in self.media
            }
        )
        self.null_token = null_token(d_model)

    def forward(self, tokens: Mapping[str, ModalityTokens]) -> Memory:
        """tokens: {modality: (B, N_m, D) + mask} -> Memory (B, M, D), mask (B, M)."""
        batch = check_modalities(tokens, self.modalities)
        null_feats, null_mask = null_entry(self.null_token, batch)
        feats, masks = [null_feats], [null_mask]
        prompt = tokens.get(PROMPT)
        start = None
        if prompt is not None and self.prompt_mode != "memory":
            start = prompt_sum(prompt.feats, prompt.mask)  # (B, 1, D)
        for name in self.media:
            media = tokens[name]
            latents = self.resamplers[name](media.feats, media.mask, start)  # (B, L, D)
            present = media.mask.any(dim=1, keepdim=True)  # (B, 1)
            feats.append(latents)
            masks.append(present.expand(-1, latents.shape[1]))
        if prompt is not None and self.prompt_mode != "add":
            feats.append(prompt.feats)
            masks.append(prompt.mask)
        mask = torch.cat(masks, dim=1)  # (B, M)
        return Memory(torch.cat(feats, dim=1).masked_fill(~mask[..., None], 0.0), mask)
