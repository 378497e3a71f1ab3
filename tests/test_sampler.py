"""The resumable sampler and loader: DDP shards make the one-process global batches, and a
loaded position resumes without repeating or skipping (also with workers, across ranks)."""

from __future__ import annotations

import itertools

import pytest

from data_modules.sampler import ResumableDataLoader, ResumableSampler

DATA = list(range(50))


def _loader(ranks: int = 1, rank: int = 0, batch: int = 4, workers: int = 0, seed: int = 0):
    sampler = ResumableSampler(DATA, num_replicas=ranks, rank=rank, seed=seed)
    return ResumableDataLoader(DATA, sampler, batch_size=batch, num_workers=workers)


def _batches(loader, epoch: int = 0) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


def test_two_ranks_make_the_global_batches_of_one_process() -> None:
    one = _batches(_loader(batch=8), epoch=3)
    ranks = [_batches(_loader(ranks=2, rank=r, batch=4), epoch=3) for r in (0, 1)]
    for step, global_batch in enumerate(one[:-1]):  # the last, partial batch is padded
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(global_batch)
    assert _batches(_loader(batch=8), epoch=4) != one, "a new order every epoch"


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_mid_epoch_neither_repeats_nor_skips(workers: int) -> None:
    loader = _loader(workers=workers)
    full = _batches(loader, epoch=2)
    loader.sampler.set_epoch(2)
    seen = [b.tolist() for b in itertools.islice(iter(loader), 5)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "samples": 20, "seed": 0}
    resumed = _loader(workers=workers)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # as Lightning does at the start of the epoch
    assert resumed.state_dict() == state, "a loaded state not yet iterated is kept"
    assert seen + [b.tolist() for b in resumed] == full
    assert _batches(resumed, epoch=3) == _batches(_loader(), epoch=3), "next epoch from 0"


def test_resume_on_another_number_of_ranks() -> None:
    two = [_loader(ranks=2, rank=r) for r in (0, 1)]
    for loader in two:
        loader.sampler.set_epoch(1)
        list(itertools.islice(iter(loader), 3))  # 3 steps x 2 ranks x 4 = 24 samples
    state = two[0].state_dict()
    assert state["samples"] == 24
    one = _loader(batch=8)
    one.load_state_dict(state)
    rest = [x for b in _batches(one, epoch=1) for x in b]
    assert rest == [x for b in _batches(_loader(batch=8), epoch=1) for x in b][24:]


def test_a_finished_epoch_resumes_at_the_next() -> None:
    loader = _loader()
    _batches(loader, epoch=0)
    state = loader.state_dict()
    assert state["samples"] == len(DATA)
    resumed = _loader()
    resumed.load_state_dict(state)
    assert _batches(resumed, epoch=1) == _batches(_loader(), epoch=1)
