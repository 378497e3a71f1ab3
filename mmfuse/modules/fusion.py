"""Fusion: modality tokens -> one fused memory.

``CrossAttentionFusion`` lives here with the pieces every fusion shares (the modality check,
type embeddings, the null token, the split of media and prompt); the other fusions are in
``fusion_perceiver.py``, ``fusion_qformer.py`` and ``fusion_concat.py``. Every fusion is built
as ``fusion(modalities=[...], d_model=..., ...)`` and maps ``{modality: ModalityTokens}`` to
``Memory``; the ``"text"`` modality, when present, is the encoded prompt, not media.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmfuse.modules.attention import Attention, FeedForward
from mmfuse.types import MODALITIES, Memory, ModalityTokens

PROMPT = "text"
"""The modality name of the encoded prompt (``model.text``); every other modality is media."""


def media_order(modalities: Sequence[str]) -> tuple[str, ...]:
    """The media modalities (all but the prompt) in a fixed order: that of ``MODALITIES``
    (image, audio), then any others in the order given."""
    known = [m for m in MODALITIES if m in modalities]
    return (*known, *(m for m in modalities if m not in MODALITIES and m != PROMPT))


def check_modalities(tokens: Mapping[str, ModalityTokens], expected: Sequence[str]) -> int:
    """Raises unless ``tokens`` holds exactly the ``expected`` modalities; returns the batch
    size."""
    if set(tokens) != set(expected):
        raise ValueError(f"fusion expects {sorted(expected)}, got {sorted(tokens)}")
    return next(iter(tokens.values())).feats.shape[0]


def type_embeddings(modalities: Sequence[str], d_model: int) -> nn.ParameterDict:
    """One learned (D,) vector per modality, added to all of its tokens."""
    return nn.ParameterDict({m: nn.Parameter(torch.randn(d_model) * 0.02) for m in modalities})


def null_token(d_model: int) -> nn.Parameter:
    """A learned (1, D) token that is always attendable: a record without any media still
    has one valid position, so no softmax runs over an all-masked row."""
    return nn.Parameter(torch.randn(1, d_model) * 0.02)


def null_entry(token: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The null token for a batch: feats (B, 1, D) and an all-True mask (B, 1)."""
    return token.expand(batch, -1, -1), torch.ones(batch, 1, dtype=torch.bool, device=token.device)


def typed_context(
    tokens: Mapping[str, ModalityTokens],
    modalities: Sequence[str],
    type_embed: nn.ParameterDict,
    null: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Adds each modality's type embedding and splits media from prompt.

    Returns:
        ctx (B, 1+N, D) and mask (B, 1+N): the null token, then the media tokens of
        ``modalities`` in the order given; prompt (B, P, D) and prompt_mask (B, P), or None
        and None without a ``"text"`` modality.
    """
    batch = next(iter(tokens.values())).feats.shape[0]
    null_feats, null_mask = null_entry(null, batch)
    feats, masks = [null_feats], [null_mask]
    prompt = prompt_mask = None
    for name in modalities:
        typed = tokens[name].feats + type_embed[name]
        if name == PROMPT:
            prompt, prompt_mask = typed, tokens[name].mask
        else:
            feats.append(typed)
            masks.append(tokens[name].mask)
    return torch.cat(feats, dim=1), torch.cat(masks, dim=1), prompt, prompt_mask


PROMPT_MODES = ("attend", "add", "both")
"""How ``CrossAttentionFusion`` uses the prompt: the queries ``attend`` to its tokens in every
block, start from their sum (``add``), or both."""


def prompt_sum(prompt: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """The sum of the real prompt tokens: prompt (B, P, D), mask (B, P) -> (B, 1, D)."""
    return (prompt * prompt_mask[..., None].to(prompt.dtype)).sum(dim=1, keepdim=True)


def start_queries(
    queries: torch.Tensor,
    batch: int,
    prompt: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Learned queries (M, D) for a batch -> (B, M, D), plus the prompt tokens the blocks
    still read. With ``mode`` ``add`` or ``both`` every query starts from the summed prompt
    (it knows what it looks for, "the red one", before it looks); with ``add`` the prompt
    tokens are not read again (None, None)."""
    q = queries.expand(batch, -1, -1)
    if prompt is None or mode not in ("add", "both"):
        return q, prompt, prompt_mask
    q = q + prompt_sum(prompt, prompt_mask)
    return (q, None, None) if mode == "add" else (q, prompt, prompt_mask)


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
        return self.attend_media(self.attend_self(q, prompt, prompt_mask), ctx, mask)

    def attend_self(
        self, q: torch.Tensor, prompt: torch.Tensor | None, prompt_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Queries (B, M, D) attend to themselves and to the prompt tokens (read only)."""
        h = self.norm_self(q)
        if prompt is None:
            return q + self.self_attn(h)
        both = torch.cat([h, self.norm_self(prompt)], dim=1)  # (B, M+P, D)
        keep = torch.cat([torch.ones_like(h[..., 0], dtype=torch.bool), prompt_mask], dim=1)
        return q + self.self_attn(h, both, keep)

    def attend_media(self, q: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Queries (B, M, D) cross-attend to the media ctx (B, N, D) + mask, then the MLP."""
        q = q + self.cross(self.norm_q(q), self.norm_ctx(ctx), mask)
        return q + self.mlp(self.norm_mlp(q))


class CrossAttentionFusion(nn.Module):
    """Learned queries attend to the tokens of every media modality at once.

    Each modality's tokens get a learned type embedding; one learned null token is always
    present so a record without any media still has something to attend to. A ``text``
    modality (the encoded prompt) is not media: the queries attend to it in their
    self-attention, before each cross-attention to the media (instruction-aware fusion), or
    its tokens' sum is added to every query before the first block (``prompt="add"``, for
    ``BagOfWordsEncoder`` tokens), or both.

    Args:
        modalities: the modality names this fusion receives, in any order.
        d_model: width of tokens and memory.
        num_queries: memory length M.
        num_layers: number of fusion blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width over ``d_model``.
        dropout: dropout in attention and MLPs.
        prompt: ``attend``, ``add`` or ``both`` (``PROMPT_MODES``); used only with a ``text``
            modality.
        query_std: standard deviation of the initial queries. With ``prompt="add"`` keep it
            near the size of the added prompt sum: the pre-norm blocks see the queries through
            a LayerNorm, so queries much smaller than the prompt all look alike.
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
        self.blocks = nn.ModuleList(
            FusionBlock(d_model, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: Mapping[str, ModalityTokens]) -> Memory:
        """tokens: {modality: (B, N_m, D) + mask} -> Memory (B, M, D), mask (B, M)."""
        batch = check_modalities(tokens, self.modalities)
        ctx, mask, prompt, prompt_mask = typed_context(
            tokens, self.modalities, self.type_embed, self.null_token
        )  # (B, N, D), (B, N)
        q, prompt, prompt_mask = start_queries(
            self.queries, batch, prompt, prompt_mask, self.prompt_mode
        )  # (B, M, D)
        for block in self.blocks:
            q = block(q, ctx, mask, prompt, prompt_mask)
        q = self.norm(q)
        return Memory(q, torch.ones(q.shape[:2], dtype=torch.bool, device=q.device))
