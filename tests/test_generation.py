"""Tests of mmfuse.generation: KV-cache equivalence, sampling, top-k/top-p, streaming."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    MEMORISED_ANSWERS,
    build_tiny,
    collate,
    mixed_records,
    train_to_memorise,
    write_media,
)

from mmfuse.generation import GenerationConfig, generate, next_token

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANSWERS = MEMORISED_ANSWERS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model trained 60 steps to memorise four answers of different lengths."""
    proc, model, _, prompts, records, base = train_to_memorise(tmp_path_factory)
    return proc, model, prompts, records, base


def test_prompts_are_left_padded_with_different_lengths(setup):
    _, _, prompts, _, _ = setup
    lengths = prompts.attention_mask.sum(dim=1).tolist()
    assert len(set(lengths)) == 4
    assert (prompts.attention_mask[:, -1] == 1).all()
    assert prompts.references == ANSWERS


def test_greedy_reproduces_the_memorised_answers(setup):
    proc, model, prompts, _, _ = setup
    out = generate(model, prompts, GenerationConfig(max_new_tokens=12))
    assert [proc.tokenizer.decode(ids) for ids in out] == ANSWERS
    eos = proc.tokenizer.eos_token_id
    assert all(ids and eos not in ids for ids in out)


def test_greedy_with_and_without_cache_are_equal(setup):
    _, model, prompts, _, _ = setup
    config = GenerationConfig(max_new_tokens=12)
    cached = generate(model, prompts, config, use_cache=True)
    uncached = generate(model, prompts, config, use_cache=False)
    assert cached == uncached
    assert len({len(ids) for ids in cached}) > 1  # rows stop at different steps


def test_sampling_with_and_without_cache_are_equal(setup):
    """Long random continuations: every step of the cache is exercised on every row."""
    _, model, prompts, _, _ = setup
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=5.0, seed=3)
    cached = generate(model, prompts, config, use_cache=True)
    uncached = generate(model, prompts, config, use_cache=False)
    assert cached == uncached
    assert sum(len(ids) for ids in cached) > 20
    assert len({tuple(ids) for ids in cached}) == 4


def test_max_new_tokens_truncates(setup):
    proc, model, prompts, _, _ = setup
    out = generate(model, prompts, GenerationConfig(max_new_tokens=2))
    full = generate(model, prompts, GenerationConfig(max_new_tokens=12))
    for short, long in zip(out, full, strict=True):
        assert len(short) <= 2 and short == long[:2]
    assert out[1] == full[1][:2] and len(out[1]) == 2  # "a red circle": cut after 2 tokens
    assert generate(model, prompts, GenerationConfig(max_new_tokens=0)) == [[]] * 4


def test_batched_generation_equals_one_by_one(setup):
    proc, model, _, records, base = setup
    batched = generate(
        model,
        collate(proc, records, base, side="left", for_generation=True),
        GenerationConfig(max_new_tokens=12),
    )
    for row, rec in enumerate(records):
        single = collate(proc, [rec], base, side="left", for_generation=True)
        assert generate(model, single, GenerationConfig(max_new_tokens=12))[0] == batched[row]


def test_sampling_is_reproducible_with_a_seed(setup):
    _, model, prompts, _, _ = setup

    def sample(seed):
        config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=5.0, seed=seed)
        return generate(model, prompts, config)

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=8))
    assert first != greedy


def test_top_k_1_sampling_equals_greedy(setup):
    _, model, prompts, _, _ = setup
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=12))
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=5.0, top_k=1, seed=0)
    assert generate(model, prompts, config) == greedy


def test_on_tokens_called_once_per_step(setup):
    proc, model, prompts, _, _ = setup
    calls = []
    out = generate(
        model,
        prompts,
        GenerationConfig(max_new_tokens=12),
        on_tokens=lambda token, finished: calls.append((token.clone(), finished.clone())),
    )
    longest = max(len(ids) for ids in out)
    assert len(calls) == longest + 1  # the last step produces the final end-of-turn token
    assert all(t.shape == (4,) and f.shape == (4,) and f.dtype == torch.bool for t, f in calls)
    assert not calls[0][1].all() and calls[-1][1].all()
    eos, pad = proc.tokenizer.eos_token_id, proc.tokenizer.pad_token_id
    for row, ids in enumerate(out):
        streamed = [int(t[row]) for t, _ in calls]
        assert streamed[: len(ids)] == ids
        assert streamed[len(ids)] == eos
        assert all(value == pad for value in streamed[len(ids) + 1 :])
        assert [bool(f[row]) for _, f in calls] == [s >= len(ids) for s in range(len(calls))]


def test_on_tokens_stops_at_max_new_tokens(setup):
    _, model, prompts, _, _ = setup
    calls = []
    generate(
        model,
        prompts,
        GenerationConfig(max_new_tokens=3),
        on_tokens=lambda token, finished: calls.append(token),
    )
    assert len(calls) == 3


# ----------------------------------------------------------------------------- next_token


def _draws(logits, config, n=3000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = logits.expand(n, -1) if logits.shape[0] == 1 else logits
    return next_token(rows, config, generator)


def test_greedy_and_zero_temperature_take_the_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, -1.0, 4.9]])
    assert next_token(logits, GenerationConfig(), None).tolist() == [1, 0]
    config = GenerationConfig(do_sample=True, temperature=0.0)
    assert next_token(logits, config, None).tolist() == [1, 0]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    drawn = _draws(logits, GenerationConfig(do_sample=True, top_k=2))
    assert set(drawn.tolist()) == {1, 2}


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.5, {0}), (0.6, {0, 1}), (0.75, {0, 1}), (0.8, {0, 1, 2}), (0.99, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    # probabilities 1/2, 1/4, 1/8, 1/16, 1/16 (exact in floating point), stored out of order
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    order = [3, 0, 4, 1, 2]  # token order[i] has probability probs[i]
    logits = torch.empty(1, 5)
    for rank, token in enumerate(order):
        logits[0, token] = math.log(probs[rank])
    drawn = _draws(logits, GenerationConfig(do_sample=True, top_p=top_p))
    assert set(drawn.tolist()) == {order[rank] for rank in kept}


def test_top_p_renormalises_the_kept_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    drawn = _draws(logits, GenerationConfig(do_sample=True, top_p=0.75), n=6000)
    share = float((drawn == 0).float().mean())
    assert share == pytest.approx(2 / 3, abs=0.03)  # 0.5 / (0.5 + 0.25)


def test_top_p_is_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]]))
    drawn = _draws(logits.repeat(1500, 1), GenerationConfig(do_sample=True, top_p=0.75))
    assert set(drawn[0::2].tolist()) == {0, 1} and set(drawn[1::2].tolist()) == {2, 3}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = _draws(logits, GenerationConfig(do_sample=True, temperature=0.1))
    hot = _draws(logits, GenerationConfig(do_sample=True, temperature=100.0))
    assert float((cold == 0).float().mean()) > 0.99
    assert float((hot == 2).float().mean()) == pytest.approx(1 / 3, abs=0.04)


@pytest.mark.parametrize("decoder", ["llama_tiny", "gpt2_tiny"])
def test_cache_equivalence_for_each_decoder_config(tmp_path, decoder):
    write_media(tmp_path)
    proc, model, _ = build_tiny(tmp_path / "out", seed=1, overrides=[f"model/decoder={decoder}"])
    model.eval()
    prompts = collate(proc, mixed_records(), tmp_path, side="left", for_generation=True)
    for config in (
        GenerationConfig(max_new_tokens=6),
        GenerationConfig(max_new_tokens=6, do_sample=True, seed=0),
    ):
        cached = generate(model, prompts, config, use_cache=True)
        assert cached == generate(model, prompts, config, use_cache=False)
        assert all(len(ids) == 6 for ids in cached)  # untrained: no early end-of-turn


def test_per_row_configs_do_not_depend_on_the_batch(setup):
    """A server batches requests with their own settings: each seeded row gives what it gives
    alone, and a row's max_new_tokens ends only that row."""
    proc, model, prompts, records, base = setup
    configs = [
        GenerationConfig(max_new_tokens=8, do_sample=True, temperature=5.0, seed=1),
        GenerationConfig(max_new_tokens=2),
        GenerationConfig(max_new_tokens=8, do_sample=True, temperature=3.0, top_p=0.9, seed=2),
        GenerationConfig(max_new_tokens=12),
    ]
    batched = generate(model, prompts, configs)
    for row, (rec, config) in enumerate(zip(records, configs, strict=True)):
        single = collate(proc, [rec], base, side="left", for_generation=True)
        assert generate(model, single, config)[0] == batched[row]
    assert len(batched[1]) <= 2 and len(batched[3]) > 2


def test_on_tokens_can_end_rows(setup):
    _, model, prompts, _, _ = setup
    full = generate(model, prompts, GenerationConfig(max_new_tokens=12))
    end_row_0 = torch.tensor([True, False, False, False])
    cut = generate(
        model, prompts, GenerationConfig(max_new_tokens=12), on_tokens=lambda t, f: end_row_0
    )
    assert cut[0] == full[0][:1] and cut[1:] == full[1:]
