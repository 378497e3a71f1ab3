"""Tests of mmfuse.running_batch (continuous batching): rows that join and leave a batch in
decoding get exactly the tokens they get alone."""

from __future__ import annotations

import pytest
from helpers import MEMORISED_ANSWERS, build_tiny, collate, train_to_memorise

from mmfuse.generation import GenerationConfig, generate
from mmfuse.running_batch import RunningBatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model trained to memorise four answers of different lengths."""
    proc, model, _, _, records, base = train_to_memorise(tmp_path_factory)
    return proc, model, records, base


def _decode(setup, schedule: dict[int, list[int]], configs: list[GenerationConfig]):
    """Runs a RunningBatch: at step s the records ``schedule[s]`` join; a row leaves at its
    end-of-turn or its token limit. Returns each record's tokens and the batch widths seen."""
    proc, model, records, base = setup
    eos = proc.tokenizer.eos_token_id
    running, live, out, widths = RunningBatch(model), [], {}, []
    step = 0
    while schedule or live:
        tokens = running.step() if live else []
        joining = schedule.pop(step, [])
        if joining:
            batch = collate(proc, [records[r] for r in joining], base, "left", True)
            tokens += running.join(batch, [configs[r] for r in joining])
            live += joining
            out.update({r: [] for r in joining})
        ended = []
        for i, (record, token) in enumerate(zip(live, tokens, strict=True)):
            if token != eos:
                out[record].append(token)
            if token == eos or len(out[record]) >= configs[record].max_new_tokens:
                ended.append(i)
        running.leave(ended)
        live = [r for i, r in enumerate(live) if i not in ended]
        widths.append(len(live))
        if running.cache is not None:  # the cache and the mask stay aligned, without waste
            assert running.cache.layers[0].keys.shape[2] == running.mask.shape[1] - 1
            assert running.mask[:, :-1].any(dim=0)[0]
        step += 1
    return [out[r] for r in sorted(out)], widths


def _alone(setup, configs: list[GenerationConfig]) -> list[list[int]]:
    proc, model, records, base = setup
    return [
        generate(model, collate(proc, [rec], base, "left", True), config)[0]
        for rec, config in zip(records, configs, strict=True)
    ]


def test_rows_joining_and_leaving_get_their_greedy_answers(setup):
    proc = setup[0]
    configs = [GenerationConfig(max_new_tokens=12)] * 4
    out, widths = _decode(setup, {0: [2], 1: [0, 3], 4: [1]}, configs)
    assert [proc.tokenizer.decode(ids) for ids in out] == MEMORISED_ANSWERS
    assert out == _alone(setup, configs)
    assert max(widths) >= 2 and widths[-1] == 0  # rows shared steps, and all left


def test_seeded_sampling_rows_are_independent_of_their_company(setup):
    configs = [
        GenerationConfig(max_new_tokens=9, do_sample=True, temperature=5.0, seed=seed)
        for seed in (1, 2, 3, 4)
    ]
    configs[1] = GenerationConfig(max_new_tokens=3)  # greedy and short, in the same batch
    out, _ = _decode(setup, {0: [0, 1], 2: [2], 3: [3]}, configs)
    assert out == _alone(setup, configs)
    assert sum(len(ids) for ids in out) > 15  # long random continuations were compared


def test_copies_of_a_prompt_share_one_prefill_and_sample_apart(setup):
    """Three choices of record 0 (seeds 1-3) and a greedy record 2: two prompts are
    encoded, four rows decode, and each row's tokens are those it gets alone."""
    proc, model, records, base = setup
    configs = [
        GenerationConfig(max_new_tokens=9, do_sample=True, temperature=5.0, seed=seed)
        for seed in (1, 2, 3)
    ] + [GenerationConfig(max_new_tokens=9)]
    encoded = []
    hook = model.fusion.register_forward_hook(lambda m, a, out: encoded.append(len(out.feats)))
    try:
        running = RunningBatch(model)
        batch = collate(proc, [records[0], records[2]], base, "left", True)
        tokens = [[t] for t in running.join(batch, configs, copies=[3, 1])]
    finally:
        hook.remove()
    assert encoded == [2] and len(running) == 4
    for _ in range(8):
        for row, token in zip(tokens, running.step(), strict=True):
            row.append(token)
    eos = proc.tokenizer.eos_token_id
    got = [row[: row.index(eos)] if eos in row else row for row in tokens]
    expected = [
        generate(model, collate(proc, [records[r]], base, "left", True), config)[0]
        for r, config in zip([0, 0, 0, 2], configs, strict=True)
    ]
    assert got == expected
    assert len({tuple(ids) for ids in got[:3]}) > 1  # the seeds did sample apart


def test_copies_must_match_the_configs(setup):
    proc, model, records, base = setup
    batch = collate(proc, records[:1], base, "left", True)
    with pytest.raises(ValueError, match="1 generation configs for 2 rows"):
        RunningBatch(model).join(batch, [GenerationConfig()], copies=[2])


def test_a_row_leaving_frees_its_cache_positions(setup):
    proc, model, records, base = setup
    running = RunningBatch(model)
    running.join(collate(proc, records, base, "left", True), [GenerationConfig()] * 4)
    running.step()
    counts = running.mask.sum(dim=1).tolist()
    longest = [row for row, count in enumerate(counts) if count == max(counts)]
    assert len(longest) < 4  # the rows' prompts differ in length
    wide = running.mask.shape[1]
    running.leave(longest)
    left = 4 - len(longest)
    assert len(running) == left and running.mask.shape[1] < wide
    assert running.cache.layers[0].keys.shape[0] == left
    running.leave(list(range(left)))
    assert len(running) == 0 and running.cache is None


def test_cross_attention_conditioning_is_refused(tmp_path, setup):
    _, _, records, base = setup
    proc, model, _ = build_tiny(tmp_path, overrides=["model/conditioning=gated_xattn"])
    batch = collate(proc, records[:1], base, "left", True)
    with pytest.raises(ValueError, match="needs prefix conditioning"):
        RunningBatch(model.eval()).join(batch, [GenerationConfig()])
