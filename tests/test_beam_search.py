"""Tests of mmfuse.beam_search: exactness against transformers, scores, batching, truncation."""

from __future__ import annotations

import pytest
import torch
from helpers import MEMORISED_ANSWERS, collate, train_to_memorise
from transformers import LlamaConfig, LlamaForCausalLM

from mmfuse.beam_search import beam_search, beam_search_embeds
from mmfuse.generation import GenerationConfig, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANSWERS = MEMORISED_ANSWERS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model half-trained (30 steps: answers and end-of-turn tokens are likely but
    greedy and beam search still disagree) and fully trained (60 steps: answers memorised)."""
    proc, model, half, prompts, records, base = train_to_memorise(tmp_path_factory, 60, 30)
    return proc, half, model, prompts, records, base


@torch.no_grad()
def sequence_logprob(model, prompts, row: int, ids: list[int], max_new_tokens: int) -> float:
    """Teacher-forced sum of log-probabilities of ``ids`` after prompt ``row``, plus that of
    the end-of-turn token when the output stopped before ``max_new_tokens``."""
    eos = model.tokenizer.eos_token_id
    inputs = model.prepare_inputs(prompts)
    prompt = inputs.embeds[row, inputs.attention_mask[row].bool()]  # (L, H), padding dropped
    target = torch.tensor(ids + [eos] if len(ids) < max_new_tokens else ids)  # (N,)
    embeds = torch.cat([prompt, model.decoder.get_input_embeddings()(target)])[None]
    logits = model.decoder(inputs_embeds=embeds, use_cache=False).logits[0]  # (L+N, V)
    logprobs = logits[len(prompt) - 1 : -1].float().log_softmax(dim=-1)  # (N, V)
    return float(logprobs.gather(1, target[:, None]).sum())


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beams_score_at_least_greedy(setup, num_beams):
    _, half, _, prompts, _, _ = setup
    n = 8
    greedy = generate(half, prompts, GenerationConfig(max_new_tokens=n))
    config = GenerationConfig(max_new_tokens=n, num_beams=num_beams, length_penalty=0.0)
    beams = beam_search(half, prompts, config)
    gains = [
        sequence_logprob(half, prompts, row, b, n) - sequence_logprob(half, prompts, row, g, n)
        for row, (g, b) in enumerate(zip(greedy, beams, strict=True))
    ]
    assert min(gains) > -1e-4
    assert max(gains) > 0.1  # beam search found a better sequence than greedy somewhere


def test_generate_dispatches_to_beam_search_and_reproduces_answers(setup):
    proc, _, model, prompts, _, _ = setup
    config = GenerationConfig(max_new_tokens=12, num_beams=3)
    out = generate(model, prompts, config)
    assert out == beam_search(model, prompts, config)
    assert [proc.tokenizer.decode(ids) for ids in out] == ANSWERS
    assert all(proc.tokenizer.eos_token_id not in ids for ids in out)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_batched_beam_search_equals_one_by_one(setup, length_penalty):
    proc, half, _, prompts, records, base = setup
    config = GenerationConfig(max_new_tokens=8, num_beams=3, length_penalty=length_penalty)
    assert len(set(prompts.attention_mask.sum(dim=1).tolist())) == 4  # four prompt lengths
    batched = beam_search(half, prompts, config)
    for row, rec in enumerate(records):
        single = collate(proc, [rec], base, side="left", for_generation=True)
        assert beam_search(half, single, config)[0] == batched[row]
    assert len({len(ids) for ids in batched}) > 1  # rows end at different steps


def test_max_new_tokens_truncates(setup):
    _, half, model, prompts, _, _ = setup
    for n in (1, 2, 3):
        out = beam_search(model, prompts, GenerationConfig(max_new_tokens=n, num_beams=3))
        assert all(len(ids) <= n for ids in out)
        assert len(out[3]) == n  # "two shapes and one beep" is cut after n tokens
    # one step: every beam ends there, so the best is the most likely first token
    first = beam_search(half, prompts, GenerationConfig(max_new_tokens=1, num_beams=3))
    assert first == generate(half, prompts, GenerationConfig(max_new_tokens=1))
    assert beam_search(model, prompts, GenerationConfig(max_new_tokens=0, num_beams=3)) == [[]] * 4


# ----------------------------------------------------------------------------- transformers

EOS, PAD, VOCAB = 2, 0, 12


@pytest.fixture(scope="module")
def llama():
    """A tiny random LlamaForCausalLM and four left-padded prompts of 3-7 tokens.

    The vocabulary is small (12 tokens) so that the end-of-turn token competes often.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        initializer_range=0.3,
    )
    decoder = LlamaForCausalLM(config).eval()
    lengths = [3, 7, 5, 4]
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, VOCAB, (length,))
        mask[row, -length:] = 1
    return decoder, ids, mask


def _strip(out: torch.Tensor, prompt_length: int) -> list[list[int]]:
    rows = out[:, prompt_length:].tolist()
    return [row[: row.index(EOS)] if EOS in row else row for row in rows]


@pytest.mark.parametrize(
    ("num_beams", "length_penalty", "early_stopping"),
    [(2, 1.0, False), (3, 0.0, False), (4, 2.0, False), (3, -1.0, False), (3, 1.0, True)],
)
def test_equals_transformers_beam_search(llama, num_beams, length_penalty, early_stopping):
    decoder, ids, mask = llama
    n = 10
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=n)
    kwargs |= dict(eos_token_id=EOS, pad_token_id=PAD)
    expected = decoder.generate(
        ids,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        **kwargs,
    )
    expected = _strip(expected, ids.shape[1])
    config = GenerationConfig(max_new_tokens=n, num_beams=num_beams, length_penalty=length_penalty)
    embeds = decoder.get_input_embeddings()(ids)  # (B, T, H)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    got = beam_search_embeds(decoder, embeds, mask, positions, EOS, config, early_stopping)
    assert got == expected
    greedy = _strip(decoder.generate(ids, **kwargs), ids.shape[1])
    assert got != greedy  # not vacuous: beams change the result of some row
    if length_penalty <= 1.0:  # (2.0 favours long hypotheses: here all reach max_new_tokens)
        assert min(len(row) for row in got) < n  # some row ends with eos
