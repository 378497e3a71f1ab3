"""Generation: mmfuse greedy decoding with its KV cache, without it, and transformers' own
``generate`` on the same decoder.

Every variant decodes exactly ``new_tokens`` tokens per row: the end-of-turn token does not
stop a row (mmfuse: the model's tokenizer is replaced, for the run, by one whose eos id
matches no token; transformers: ``eos_token_id=None``), so all three do the same work and,
greedy, produce the same tokens (checked). Each call includes the encoders and the fusion
(``prepare_inputs``), which transformers' ``generate`` is then given as ``inputs_embeds``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from benchmarks.common import alternate, median
from data_modules.conversation import ConversationDataset
from mmfuse.generation import GenerationConfig, generate
from mmfuse.model import MMFuseModel
from mmfuse.processing.collate import Collator
from mmfuse.processing.processor import Processor
from mmfuse.types import Batch

try:  # cross-attention conditioning: decoder calls see the memory inside this scope
    from mmfuse.modules.conditioning import conditioned
except ImportError:  # a tree where the memory is always a prefix
    conditioned = None


class _NoEos:
    """A tokenizer stand-in whose end-of-turn id matches no token (everything else is the
    wrapped tokenizer's)."""

    eos_token_id = -1

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


@contextlib.contextmanager
def eos_suppressed(model: MMFuseModel) -> Iterator[None]:
    """mmfuse generation runs to ``max_new_tokens`` in this scope."""
    tokenizer = model.tokenizer
    model.tokenizer = _NoEos(tokenizer)
    try:
        yield
    finally:
        model.tokenizer = tokenizer


def prompt_batch(processor: Processor, path: str | Path, rows: int) -> Batch:
    """The first ``rows`` records of a conversation file as left-padded generation prompts."""
    data = ConversationDataset(path, processor, for_generation=True)
    collate = Collator(processor.tokenizer.pad_token_id, "left", processor.image.size)
    return collate([data[i] for i in range(rows)])


def mmfuse_generate(model: MMFuseModel, batch: Batch, new_tokens: int, use_cache: bool):
    """mmfuse greedy decoding of exactly ``new_tokens`` tokens per row."""
    with eos_suppressed(model):
        return generate(model, batch, GenerationConfig(max_new_tokens=new_tokens), use_cache)


@torch.no_grad()
def hf_generate(model: MMFuseModel, batch: Batch, new_tokens: int) -> list[list[int]]:
    """transformers' greedy ``generate`` of exactly ``new_tokens`` tokens per row on the
    model's decoder, from the same prefix embeddings mmfuse builds."""
    inputs = model.prepare_inputs(batch)
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=model.tokenizer.pad_token_id,
        bos_token_id=None,
    )
    memory = getattr(inputs, "memory", None)
    scope = conditioned(model.decoder, memory) if conditioned else contextlib.nullcontext()
    with warnings.catch_warnings(), scope:
        warnings.simplefilter("ignore")
        out = model.decoder.generate(
            inputs_embeds=inputs.embeds,
            attention_mask=inputs.attention_mask,
            generation_config=config,
        )
    return out.tolist()


@dataclass
class GenerationResult:
    cached_s: float
    uncached_s: float
    hf_s: float
    cache_speedup: float
    mmfuse_over_hf: float
    agreement: float  # share of tokens before the three outputs of a row first differ
    tokens_per_row: int


def agreement(outputs: list[list[list[int]]]) -> float:
    """The share of generated tokens (over all rows) before the outputs first differ."""
    agreed = total = 0
    for rows in zip(*outputs, strict=True):
        length = min(len(r) for r in rows)
        same = next((i for i in range(length) if len({r[i] for r in rows}) > 1), length)
        agreed, total = agreed + same, total + max(len(r) for r in rows)
    return agreed / total if total else 1.0


def measure_generation(
    model: MMFuseModel,
    batch: Batch,
    new_tokens: int,
    warmup: int,
    repeats: int,
    uncached_repeats: int | None = None,
) -> GenerationResult:
    """Times the three variants side by side (medians of ``repeats`` after ``warmup``);
    the slow uncached variant may run fewer repeats (``uncached_repeats``)."""
    model.eval()
    outputs: dict[str, list[list[int]]] = {}

    def keep(name: str, fn):
        def run() -> None:
            outputs[name] = fn()

        return run

    runs = {
        "cached": keep("cached", lambda: mmfuse_generate(model, batch, new_tokens, True)),
        "hf": keep("hf", lambda: hf_generate(model, batch, new_tokens)),
    }
    times = alternate(runs, warmup, repeats)
    uncached = alternate(
        {"uncached": keep("uncached", lambda: mmfuse_generate(model, batch, new_tokens, False))},
        min(warmup, 1),
        uncached_repeats or repeats,
    )["uncached"]
    cached_tokens = outputs["cached"]
    agreed = agreement([cached_tokens, outputs["uncached"], outputs["hf"]])
    cached_s, hf_s, uncached_s = median(times["cached"]), median(times["hf"]), median(uncached)
    return GenerationResult(
        cached_s,
        uncached_s,
        hf_s,
        uncached_s / cached_s,
        cached_s / hf_s,
        agreed,
        min(len(row) for row in cached_tokens),
    )
