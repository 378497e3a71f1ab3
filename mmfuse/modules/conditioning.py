"""Decoder conditioning: how the fused memory enters the language model.

Every conditioning is built as ``conditioning(lm_hidden=..., lm_layers=...)`` (the decoder's
width and number of layers) and turns the decoder's text side of a batch plus the memory into
``DecoderInputs`` with ``prepare``:

- ``PrefixConditioning`` (LLaVA-style): the projected memory tokens are spliced into the input
  embeddings at the record's first media placeholder (``<|image|>`` or ``<|audio|>``);
- ``GatedCrossAttentionConditioning`` (Flamingo): the token sequence is left as it is and
  tanh-gated cross-attention blocks, run before every k-th decoder layer, read the memory.

The blocks of the second enter the decoder only inside ``conditioned(decoder, memory)``:
forward pre-hooks registered on the decoder's layer modules for the duration of a call (a
forward pass or a whole generation) and removed in ``finally``. Nothing is patched or stored
on the decoder, which stays a plain transformers model (``save_pretrained`` writes exactly the
language model; the blocks are ``conditioning.*`` weights of ``MMFuseModel``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from mmfuse.modules.attention import Attention, FeedForward
from mmfuse.processing.text import IGNORE_INDEX
from mmfuse.types import Memory


class TextInputs(NamedTuple):
    """The decoder's text side of a batch, before conditioning.

    embeds (B, T, H) token embeddings, attention_mask (B, T), labels (B, T); placeholder (B, T)
    bool, True on media placeholder tokens; has_memory (B,) bool, True on rows whose memory
    holds something to read (media, or an encoded prompt).
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    placeholder: torch.Tensor
    has_memory: torch.Tensor


class DecoderInputs(NamedTuple):
    """What the decoder consumes for one batch (L positions).

    embeds (B, L, H), attention_mask (B, L), position_ids (B, L), labels (B, L) (not shifted);
    token_slots (B, T): the index in L of every input token (padding and removed placeholders
    included: they are masked); memory_slots (B, M): the index in L of every memory token
    with the prefix, None otherwise; memory: the cross-attention memory, None with the prefix
    (enter it around decoder calls with ``conditioned``).
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    token_slots: torch.Tensor
    memory_slots: torch.Tensor | None = None
    memory: CrossAttentionMemory | None = None


def attended_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, L) that count only attended tokens: left and right padding give every
    token the same position; masked entries get 0."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- prefix


class PrefixConditioning(nn.Module):
    """Projects memory tokens to the decoder width and splices them into the token sequence
    at the media placeholder (see ``splice_memory``).

    Args:
        d_model: memory width.
        lm_hidden: the decoder's hidden size.
        lm_layers: the decoder's number of layers (unused: the prefix leaves the layers alone).
    """

    def __init__(self, d_model: int, lm_hidden: int, lm_layers: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, lm_hidden))

    def forward(self, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory (B, M, D) -> prefix embeddings (B, M, H) and their mask (B, M)."""
        return self.proj(memory.feats), memory.mask.long()

    def prepare(self, memory: Memory, text: TextInputs) -> DecoderInputs:
        """The spliced decoder inputs (L = M + T)."""
        prefix, prefix_mask = self(memory)  # (B, M, H), (B, M)
        return splice_memory(text, prefix.to(text.embeds.dtype), prefix_mask)


def splice_memory(
    text: TextInputs, prefix: torch.Tensor, prefix_mask: torch.Tensor
) -> DecoderInputs:
    """Puts the M memory tokens in the place of each row's first media placeholder.

    - The first placeholder token (``<|image|>`` or ``<|audio|>``) is replaced by the memory;
      any later one (the audio placeholder of a record with both media) is removed: the memory
      fuses every medium, so it enters once.
    - A row without a placeholder (a tokenizer whose template renders none) gets the memory
      before its first token. A row with nothing to read (``text.has_memory`` False: no
      media, no encoded prompt) keeps its memory tokens masked: they reach no other token,
      yet every conditioning, fusion and encoder parameter still gets a (zero) gradient each
      step, so DDP needs no unused-parameter search.
    - Masked entries (padding, removed placeholders, masked memory) are moved, in order, to
      the front of the row and the attended ones keep their order at the end: every row
      comes out left-padded, a masked entry never sits before a supervised label (the
      targets of ``logits[:, t]`` are ``labels[:, t+1]``), and left- and right-padded
      batches give the same decoder inputs. Positions count only attended entries.

    Args:
        text: the token side; ``text.embeds`` (B, T, H).
        prefix: (B, M, H) projected memory.
        prefix_mask: (B, M) memory mask.

    Returns:
        ``DecoderInputs`` of L = M + T positions; labels are ``IGNORE_INDEX`` on memory and
        masked entries.
    """
    b, t, h = text.embeds.shape
    m = prefix.shape[1]
    device = text.embeds.device
    real = text.attention_mask.bool()  # (B, T)
    placeholder = text.placeholder & real
    first_real = real.long().argmax(dim=1)  # (B,) (argmax: the first maximum)
    at = torch.where(placeholder.any(dim=1), placeholder.long().argmax(dim=1), first_real)[:, None]
    # the virtual row: tokens[:at], memory, tokens[at:]  (the replaced placeholder is at at+M)
    j = torch.arange(t + m, device=device)[None]  # (1, L)
    is_memory = (j >= at) & (j < at + m)  # (B, L)
    token_index = torch.where(j < at, j, j - m).clamp(0, t - 1)  # (B, L)
    memory_index = (j - at).clamp(0, m - 1)  # (B, L)
    keep_token = real & ~placeholder  # (B, T)
    keep_memory = prefix_mask.bool() & text.has_memory[:, None]  # (B, M)
    keep = torch.where(
        is_memory, keep_memory.gather(1, memory_index), keep_token.gather(1, token_index)
    )
    # stable partition: masked entries first, attended ones in order at the end
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # (B, L)
    is_memory, token_index = is_memory.gather(1, order), token_index.gather(1, order)
    memory_index, mask = memory_index.gather(1, order), keep.gather(1, order)
    embeds = torch.where(
        is_memory[..., None],
        prefix.gather(1, memory_index[..., None].expand(-1, -1, h)),
        text.embeds.gather(1, token_index[..., None].expand(-1, -1, h)),
    )  # (B, L, H)
    labels = text.labels.gather(1, token_index).masked_fill(is_memory | ~mask, IGNORE_INDEX)
    slot = order.argsort(dim=1)  # (B, L): the slot of every virtual-row entry
    arange_t = torch.arange(t, device=device)[None]
    token_slots = slot.gather(1, torch.where(arange_t < at, arange_t, arange_t + m))  # (B, T)
    memory_slots = slot.gather(1, at + torch.arange(m, device=device)[None])  # (B, M)
    mask = mask.to(text.attention_mask.dtype)
    return DecoderInputs(embeds, mask, attended_positions(mask), labels, token_slots, memory_slots)


# ----------------------------------------------------------------------------- gated x-attn


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's tanh-gated cross-attention block; both gates start at 0, so a pretrained LM
    is unchanged until they learn.

    ``x + tanh(a) * attn(norm(x), memory)``, then ``+ tanh(f) * ff(norm(x))``.

    Args:
        dim: the decoder's hidden size.
        memory_dim: the memory width.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: feed-forward width over ``dim``.
        dropout: attention and feed-forward dropout.
    """

    def __init__(
        self, dim: int, memory_dim: int, num_heads: int, mlp_ratio: float, dropout: float
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, context_dim=memory_dim, dropout=dropout)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_ratio, dropout)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, L, H) attends to the memory's keys and values (B, h, M, d), mask (B, M)."""
        x = x + self.attn_gate.tanh() * self.attn(self.norm(x), mask=mask, kv=kv)
        return x + self.ff_gate.tanh() * self.ff(self.ff_norm(x))


@dataclass
class CrossAttentionMemory:
    """The memory as the cross-attention blocks read it, projected once per call or
    generation: per block its keys and values (B, h, M, d), and the mask (B, M).

    Attributes:
        kv: one (keys, values) pair per block of ``owner``.
        mask: (B, M) bool, True where a memory token may be attended to.
        owner: the conditioning that made it (its blocks read it).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    owner: GatedCrossAttentionConditioning = field(repr=False)

    def index_select(self, index: torch.Tensor) -> CrossAttentionMemory:
        """The rows ``index`` (N,) of the batch: beams following their parents."""
        kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv]
        return replace(self, kv=kv, mask=self.mask.index_select(0, index))

    def repeat_interleave(self, repeats: int) -> CrossAttentionMemory:
        """Every row ``repeats`` times in a row (row b -> rows b*r .. b*r+r-1): for beams."""
        index = torch.arange(self.mask.shape[0], device=self.mask.device)
        return self.index_select(index.repeat_interleave(repeats))


class GatedCrossAttentionConditioning(nn.Module):
    """Flamingo's conditioning: a gated cross-attention block before every ``every``-th decoder
    layer (before layers ``every-1, 2*every-1, ...``, as in OpenFlamingo), attending from the
    text hidden states to the memory. The token sequence is not changed (media placeholders
    stay ordinary tokens).

    Args:
        d_model: memory width.
        lm_hidden: the decoder's hidden size.
        lm_layers: the decoder's number of layers.
        every: a block before every ``every``-th layer.
        num_heads: heads of each block's attention (must divide ``lm_hidden``).
        mlp_ratio: each block's feed-forward width over ``lm_hidden``.
        dropout: dropout in the blocks.
    """

    def __init__(
        self,
        d_model: int,
        lm_hidden: int,
        lm_layers: int,
        every: int = 1,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if every < 1 or every > lm_layers:
            raise ValueError(
                f"model.conditioning.every: {every} is not in 1..{lm_layers} (decoder layers)"
            )
        if lm_hidden % num_heads:
            raise ValueError(
                f"model.conditioning.num_heads: {num_heads} does not divide the decoder's "
                f"hidden size {lm_hidden}"
            )
        self.layers = tuple(i for i in range(lm_layers) if (i + 1) % every == 0)
        self.memory_norm = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(lm_hidden, d_model, num_heads, mlp_ratio, dropout)
            for _ in self.layers
        )

    def forward(self, memory: Memory) -> CrossAttentionMemory:
        """Memory (B, M, D) -> every block's keys and values: computed once per call."""
        feats = self.memory_norm(memory.feats)
        kv = [block.attn.project_context(feats) for block in self.blocks]
        return CrossAttentionMemory(kv, memory.mask.bool(), self)

    def prepare(self, memory: Memory, text: TextInputs) -> DecoderInputs:
        """The token embeddings as they are (L = T), with the projected memory."""
        mask = text.attention_mask
        slots = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        return DecoderInputs(
            text.embeds, mask, attended_positions(mask), text.labels, slots, memory=self(memory)
        )

    @contextlib.contextmanager
    def attach(self, decoder: nn.Module, memory: CrossAttentionMemory) -> Iterator[MemoryScope]:
        """Runs the blocks before their decoder layers while the scope is open.

        Forward pre-hooks on the layer modules read the memory from the scope; they are
        removed and the scope is emptied on exit, whatever happens. With transformers'
        gradient checkpointing the hooks run outside the checkpointed ``forward``, so the
        recomputation in the backward pass does not need them.
        """
        if memory.owner is not self:
            raise ValueError("the memory was projected by another conditioning module")
        layers = decoder_layers(decoder)
        if len(layers) <= max(self.layers, default=-1):
            raise ValueError(f"conditioning built for more decoder layers than {len(layers)}")
        scope = MemoryScope(memory)
        handles = []
        try:
            for number, (block, index) in enumerate(zip(self.blocks, self.layers, strict=True)):
                hook = functools.partial(_run_block, scope, block, number)
                handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
            yield scope
        finally:
            for handle in handles:
                handle.remove()
            scope.memory = None


@dataclass
class MemoryScope:
    """The memory the cross-attention hooks read during one ``conditioned`` scope.

    ``reorder`` makes it follow the rows of the KV cache (beam search); it is None outside
    the scope and without cross-attention.
    """

    memory: CrossAttentionMemory | None = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps the rows ``index`` (N,), as ``Cache.reorder_cache`` does."""
        if self.memory is not None:
            self.memory = self.memory.index_select(index)


def _run_block(
    scope: MemoryScope,
    block: GatedCrossAttentionBlock,
    number: int,
    layer: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook: the layer's input hidden states (B, L, H) first pass through
    ``block``, the ``number``-th of the conditioning, with that block's memory keys/values."""
    memory = scope.memory
    if memory is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    dtype = block.norm.weight.dtype
    out = block(hidden.to(dtype), memory.kv[number], memory.mask).to(hidden.dtype)
    if args:
        return (out, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": out}


@contextlib.contextmanager
def conditioned(decoder: nn.Module, memory: CrossAttentionMemory | None) -> Iterator[MemoryScope]:
    """The scope in which ``decoder`` calls see ``memory`` (``DecoderInputs.memory``); without
    a memory (the prefix) it changes nothing."""
    if memory is None:
        yield MemoryScope()
        return
    with memory.owner.attach(decoder, memory) as scope:
        yield scope


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a transformers causal LM (``model.layers`` for
    LLaMA/Qwen2/Mistral, ``transformer.h`` for GPT-2, ...).

    Raises:
        ValueError: when no single layer list of ``config.num_hidden_layers`` is found.
    """
    count = decoder.config.num_hidden_layers
    base = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder
    for name in ("layers", "h", "blocks", "block"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) == count:
            return layers
    found = [m for m in decoder.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(
            f"{type(decoder).__name__}: no single list of {count} decoder layers found"
        )
    return found[0]
