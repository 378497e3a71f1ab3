"""Autoregressive generation with an explicit KV cache: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmfuse.model import MMFuseModel
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
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


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


@torch.no_grad()
def generate(
    model: MMFuseModel,
    batch: Batch,
    config: GenerationConfig,
    use_cache: bool = True,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Generates a continuation for every record of a (left-padded) batch.

    Args:
        model: the model; its tokenizer's eos token ends a row.
        batch: prompts ending with the assistant header.
        config: decoding settings.
        use_cache: reuse keys and values of earlier positions (the KV cache); without it
            every step re-runs the whole sequence (for tests and benchmarks).
        on_tokens: called after each step with the new tokens (B,) and the finished mask (B,).

    Returns:
        The generated ids of each row, without the end-of-turn token.
    """
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    embed = model.decoder.get_input_embeddings()
    inputs = model.prepare_inputs(batch)
    embeds, mask, positions = inputs.embeds, inputs.attention_mask, inputs.position_ids
    device = embeds.device
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    finished = torch.zeros(embeds.shape[0], dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(embeds.shape[0])]
    step_embeds, step_positions, cache = embeds, positions, None
    for _ in range(config.max_new_tokens):
        result = model.decoder(
            inputs_embeds=step_embeds,
            attention_mask=mask,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=use_cache,
            logits_to_keep=1,
        )
        token = next_token(result.logits[:, -1].float(), config, generator)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad), token)
        for row, value in enumerate(token.tolist()):
            if not finished[row] and value != eos:
                out[row].append(value)
        finished = finished | (token == eos)
        if on_tokens is not None:
            on_tokens(token, finished)
        if bool(finished.all()):
            break
        new = embed(token)[:, None]  # (B, 1, H)
        new_position = positions[:, -1:] + 1  # (B, 1)
        positions = torch.cat([positions, new_position], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if use_cache:
            cache = result.past_key_values
            step_embeds, step_positions = new, new_position
        else:
            embeds = torch.cat([embeds, new], dim=1)
            step_embeds, step_positions = embeds, positions
    return out
