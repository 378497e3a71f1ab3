"""Q-Former fusion (BLIP-2 / InstructBLIP): queries and prompt share the self-attention."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmfuse.modules.attention import FeedForward
from mmfuse.modules.fusion import (
    PROMPT,
    PROMPT_MODES,
    FusionBlock,
    check_modalities,
    null_token,
    start_queries,
    type_embeddings,
    typed_context,
)
from mmfuse.types import Memory, ModalityTokens


class QFormerBlock(FusionBlock):
    """A fusion block in which the prompt tokens are updated too.

    Queries and prompt tokens form one sequence for the self-attention (each attends to
    both, padded prompt tokens are masked as keys); the queries then cross-attend to the
    media and pass the query MLP, the prompt tokens pass their own MLP (BLIP-2's text FFN).
    The next block's queries so read a prompt that has already read the queries, and through
    them the media.

    With ``update_prompt=False`` (the last block, whose prompt output nothing would read) it
    is a plain ``FusionBlock``: the prompt is read only, and returned unchanged.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, update_prompt: bool
    ) -> None:
        super().__init__(dim, num_heads, mlp_ratio, dropout)
        self.norm_prompt_mlp = nn.LayerNorm(dim) if update_prompt else None
        self.prompt_mlp = FeedForward(dim, mlp_ratio, dropout) if update_prompt else None

    def forward(  # type: ignore[override]
        self,
        q: torch.Tensor,
        ctx: torch.Tensor,
        mask: torch.Tensor,
        prompt: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, M, D), media ctx (B, N, D) + mask (B, N), prompt (B, P, D) + mask (B, P)
        -> q (B, M, D), prompt (B, P, D)."""
        if prompt is None or self.prompt_mlp is None:
            return super().forward(q, ctx, mask, prompt, prompt_mask), prompt
        joint = torch.cat([q, prompt], dim=1)  # (B, M+P, D)
        keep = torch.cat([torch.ones_like(q[..., 0], dtype=torch.bool), prompt_mask], dim=1)
        joint = joint + self.self_attn(self.norm_self(joint), mask=keep)
        q, prompt = joint.split([q.shape[1], prompt.shape[1]], dim=1)
        prompt = prompt + self.prompt_mlp(self.norm_prompt_mlp(prompt))
        return self.attend_media(q, ctx, mask), prompt


class QFormerFusion(nn.Module):
    """BLIP-2's Q-Former, conditioned on the prompt as in InstructBLIP.

    Learned queries and the prompt tokens (a ``text`` modality) self-attend jointly in every
    block and both are updated; only the queries cross-attend to the media tokens (all media
    modalities at once, each with a learned type embedding, plus an always-valid null token)
    and only the queries become the memory (M = ``num_queries``, all valid).

    The difference from ``CrossAttentionFusion``, whose prompt tokens stay as the text
    encoder gave them: here the prompt is rewritten block by block in the light of the
    queries, which have read the media. Without a prompt encoder the two are the same
    architecture.

    Args:
        modalities: the modality names this fusion receives, in any order.
        d_model: width of tokens and memory.
        num_queries: memory length M.
        num_layers: Q-Former blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width over ``d_model`` (query and prompt MLPs).
        dropout: dropout in attention and MLPs.
        prompt: ``attend`` (the prompt tokens join the self-attention, as above), ``add``
            (their sum is added to every query before the first block and they are not
            read otherwise, as ``CrossAttentionFusion`` does for ``BagOfWordsEncoder``
            tokens) or ``both``; used only with a ``text`` modality.
        query_std: standard deviation of the initial queries (with ``add``, about the size
            of the prompt sum: see ``CrossAttentionFusion``).
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
        prompt: str = "attend",
        query_std: float = 0.02,
    ) -> None:
        super().__init__()
        if prompt not in PROMPT_MODES:
            raise ValueError(f"fusion.prompt: {prompt!r} is not one of {PROMPT_MODES}")
        self.modalities = tuple(modalities)
        self.prompt_mode = prompt
        self.queries = nn.Parameter(torch.randn(num_queries, d_model) * query_std)
        self.type_embed = type_embeddings(self.modalities, d_model)
        self.null_token = null_token(d_model)
        # every parameter takes part in every step: no prompt MLP without prompt tokens in
        # the self-attention, nor in the last block (its updated prompt would reach nothing)
        with_prompt = PROMPT in self.modalities and prompt != "add"
        self.blocks = nn.ModuleList(
            QFormerBlock(d_model, num_heads, mlp_ratio, dropout, with_prompt and i < num_layers - 1)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: Mapping[str, ModalityTokens]) -> Memory:
        """tokens: {modality: (B, N_m, D) + mask} -> Memory (B, M, D), mask (B, M)."""
        batch = check_modalities(tokens, self.modalities)
        ctx, mask, prompt, prompt_mask = typed_context(
            tokens, self.modalities, self.type_embed, self.null_token
        )  # (B, N, D), (B, N), (B, P, D) | None, (B, P) | None
        q, prompt, prompt_mask = start_queries(
            self.queries, batch, prompt, prompt_mask, self.prompt_mode
        )  # (B, M, D)
        for block in self.blocks:
            q, prompt = block(q, ctx, mask, prompt, prompt_mask)
        q = self.norm(q)
        return Memory(q, torch.ones(q.shape[:2], dtype=torch.bool, device=q.device))
