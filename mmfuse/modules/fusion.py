"""Fusion: modality tokens -> one fused memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmfuse.modules.attention import Attention, FeedForward
from mmfuse.types import Memory, ModalityTokens


class FusionBlock(nn.Module):
    """Pre-norm block: queries self-attend (with the prompt tokens, if any), cross-attend to
    the media, then pass an MLP.

    Attending to the prompt first makes the cross-attention of the same block
    instruction-aware: a query can look for "the red one" in the image the question names.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim)
        self.cross = Attention(dim, num_heads, dropout=dropout)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio, dropout)

    def forward(
        self,
        q: torch.Tensor,
        ctx: torch.Tensor,
        mask: torch.Tensor,
        prompt: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q (B, M, D), media ctx (B, N, D) + mask (B, N), prompt (B, P, D) + mask (B, P)
        -> (B, M, D)."""
        h = self.norm_self(q)
        if prompt is None:
            q = q + self.self_attn(h)
        else:  # queries attend to themselves and to the prompt tokens
            both = torch.cat([h, self.norm_self(prompt)], dim=1)  # (B, M+P, D)
            keep = torch.cat([torch.ones_like(h[..., 0], dtype=torch.bool), prompt_mask], dim=1)
            q = q + self.self_attn(h, both, keep)
        q = q + self.cross(self.norm_q(q), self.norm_ctx(ctx), mask)
        return q + self.mlp(self.norm_mlp(q))


class CrossAttentionFusion(nn.Module):
    """Learned queries attend to the tokens of every media modality at once.

    Each modality's tokens get a learned type embedding; one learned null token is always
    present so a record without any media still has something to attend to. A ``text``
    modality (the encoded prompt) is not media: the queries attend to it in their
    self-attention, before each cross-attention to the media (instruction-aware fusion).

    Args:
        modalities: the modality names this fusion receives, in any order.
        d_model: width of tokens and memory.
        num_queries: memory length M.
        num_layers: number of fusion blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width over ``d_model``.
        dropout: dropout in attention and MLPs.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        d_model: int,
        num_queries: int = 32,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.queries = nn.Parameter(torch.randn(num_queries, d_model) * 0.02)
        self.type_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(d_model) * 0.02) for m in self.modalities}
        )
        self.null_token = nn.Parameter(torch.randn(1, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            FusionBlock(d_model, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: Mapping[str, ModalityTokens]) -> Memory:
        """tokens: {modality: (B, N_m, D) + mask} -> Memory (B, M, D), mask (B, M)."""
        if set(tokens) != set(self.modalities):
            raise ValueError(f"fusion expects {sorted(self.modalities)}, got {sorted(tokens)}")
        batch = next(iter(tokens.values())).feats.shape[0]
        feats = [self.null_token.expand(batch, -1, -1)]
        masks = [torch.ones(batch, 1, dtype=torch.bool, device=self.queries.device)]
        prompt = prompt_mask = None
        for name in self.modalities:
            typed = tokens[name].feats + self.type_embed[name]
            if name == "text":
                prompt, prompt_mask = typed, tokens[name].mask
            else:
                feats.append(typed)
                masks.append(tokens[name].mask)
        ctx, mask = torch.cat(feats, dim=1), torch.cat(masks, dim=1)  # (B, N, D), (B, N)
        q = self.queries.expand(batch, -1, -1)  # (B, M, D)
        for block in self.blocks:
            q = block(q, ctx, mask, prompt, prompt_mask)
        q = self.norm(q)
        return Memory(q, torch.ones(q.shape[:2], dtype=torch.bool, device=q.device))
