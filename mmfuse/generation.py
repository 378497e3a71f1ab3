"""Autoregressive generation with an explicit KV cache: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import Cache, PreTrainedModel

from mmfuse.model import MMFuseModel
from mmfuse.modules.conditioning import conditioned
from mmfuse.types import Batch


@dataclass
class GenerationConfig:
    """Decoding settings; greedy when ``do_sample`` is False.

    Attributes:
        max_new_tokens: upper bound on generated tokens (the end-of-turn token included).
        do_sample: sample instead of taking the arg-max.
        temperature: logits are divided by it before sampling.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set whose probability reaches p (1.0 = all).
        seed: seeds the sampler, making sampled output reproducible.
        num_beams: beam search with this many beams when above 1 (deterministic; the
            sampling settings are then ignored).
        length_penalty: beam scores are divided by ``length ** length_penalty``.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0


def next_token(
    logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Picks one token per row from (B, V) logits -> (B,)."""
    if not config.do_sample or config.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k > 0:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= config.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def pick_per_row(
    logits: torch.Tensor,
    configs: Sequence[GenerationConfig],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token per row from (B, V) logits, each row with its own settings and generator."""
    if not any(c.do_sample for c in configs):
        return logits.argmax(dim=-1)
    pairs = zip(configs, generators, strict=True)
    return torch.cat([next_token(logits[r : r + 1], c, g) for r, (c, g) in enumerate(pairs)])


def seeded_generators(
    configs: Sequence[GenerationConfig], device: torch.device
) -> list[torch.Generator | None]:
    """A generator seeded with each config's seed where it samples with one, else None."""
    return [
        torch.Generator(device=device).manual_seed(c.seed)
        if c.do_sample and c.seed is not None
        else None
        for c in configs
    ]


def decoder_step(
    decoder: PreTrainedModel,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Cache | None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, Cache | None]:
    """One decoder call on new input embeddings (B, t, H) -> last-position logits (B, V) in
    fp32 and the updated KV cache."""
    result = decoder(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=use_cache,
        logits_to_keep=1,
    )
    return result.logits[:, -1].float(), result.cache


def append_position(
    mask: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Makes room for one more token per row: mask (B, L+1), positions (B, L+1) and the new
    token's position (B, 1)."""
    new_position = positions[:, -1:] + 1  # (B, 1)
    positions = torch.cat([positions, new_position], dim=1)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return mask, positions, new_position


@torch.no_grad()
def generate(
    model: MMFuseModel,
    batch: Batch,
    config: GenerationConfig | Sequence[GenerationConfig],
    use_cache: bool = True,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> list[list[int]]:
    """Generates a continuation for every record of a (left-padded) batch.

    Args:
        model: the model; its tokenizer's eos token ends a row.
        batch: prompts ending with the assistant header.
        config: decoding settings, one for the whole batch (one generator draws for all
            rows) or one per row (a server batching different requests: each seeded row
            samples from its own generator, so its output does not depend on its batch).
        use_cache: reuse keys and values of earlier positions (the KV cache); without it
            every step re-runs the whole sequence (for tests and benchmarks).
        on_tokens: called after each step with the new tokens (B,) and the mask (B,) of rows
            whose token is not part of the output (end-of-turn or padding). It may return a
            (B,) bool mask of rows to end after this step (a stop string was seen).

    Returns:
        The generated ids of each row, without the end-of-turn token.
    """
    rows = batch.input_ids.shape[0]
    configs = [config] * rows if isinstance(config, GenerationConfig) else list(config)
    if len(configs) != rows:
        raise ValueError(f"{len(configs)} generation configs for a batch of {rows} rows")
    if any(c.num_beams > 1 for c in configs):
        if any(c != configs[0] for c in configs):
            raise ValueError("beam search needs one generation config for the whole batch")
        from mmfuse.beam_search import beam_search

        return beam_search(model, batch, configs[0])
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    embed = model.decoder.get_input_embeddings()
    # the memory is encoded (and, with cross-attention, projected to keys and values) once
    inputs = model.prepare_inputs(batch)
    embeds, mask, positions = inputs.embeds, inputs.attention_mask, inputs.position_ids
    device = embeds.device
    shared = isinstance(config, GenerationConfig)
    generators = seeded_generators(configs[:1] if shared else configs, device)  # batch or rows
    limits = torch.tensor([c.max_new_tokens for c in configs], device=device)  # (B,)
    finished = limits <= 0  # (B,)
    out: list[list[int]] = [[] for _ in range(rows)]
    step_embeds, step_positions, cache = embeds, positions, None
    with conditioned(model.decoder, inputs.memory):
        for step in range(int(limits.max())):
            logits, step_cache = decoder_step(  # (B, V)
                model.decoder, step_embeds, mask, step_positions, cache, use_cache
            )
            if shared:
                token = next_token(logits, configs[0], generators[0])  # (B,)
            else:
                token = pick_per_row(logits, configs, generators)
            token = torch.where(finished, torch.full_like(token, pad), token)
            for row, value in enumerate(token.tolist()):
                if not finished[row] and value != eos:
                    out[row].append(value)
            finished = finished | (token == eos)
            stop = on_tokens(token, finished) if on_tokens is not None else None
            finished = finished | (limits <= step + 1)
            if stop is not None:
                finished = finished | stop
            if bool(finished.all()):
                break
            new = embed(token)[:, None]  # (B, 1, H)
            mask, positions, new_position = append_position(mask, positions)
            if use_cache:
                cache = step_cache
                step_embeds, step_positions = new, new_position
            else:
                embeds = torch.cat([embeds, new], dim=1)
                step_embeds, step_positions = embeds, positions
    return out
