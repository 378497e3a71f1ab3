"""Length-grouped batching: every record once per epoch, batches of similar length (more real
tokens per padded position), composing with DDP sharding and mid-epoch resume; record sizes
from token counts and audio headers; the padding efficiency logged per epoch."""

from __future__ import annotations

import csv
import itertools
import json
import random
from pathlib import Path

import pytest
from helpers import processor, record, write_wav

from data_modules.conversation import ConversationDataModule
from data_modules.lengths import record_lengths
from data_modules.sampler import LengthGroupedSampler, ResumableDataLoader, ResumableSampler
from mmfuse.train import train
from tests.conftest import tiny_train_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 203  # not a multiple of the batch: a partial last batch
rng = random.Random(0)
LENGTHS = [rng.choice([5, 10, 20, 40, 80, 160]) + rng.randint(0, 4) for _ in range(N)]
DATA = list(range(N))


def _sampler(ranks=1, rank=0, batch=8, seed=0, grouped=True, **kwargs):
    if grouped:
        return LengthGroupedSampler(
            DATA,
            LENGTHS,
            batch,
            group_batches=8,
            num_replicas=ranks,
            rank=rank,
            seed=seed,
            **kwargs,
        )
    return ResumableSampler(DATA, num_replicas=ranks, rank=rank, seed=seed, **kwargs)


def _batches(sampler, batch=8, epoch=0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    order = [int(i) for i in sampler]
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _efficiency(batches) -> float:
    real = sum(LENGTHS[i] for b in batches for i in b)
    padded = sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)
    return real / padded


def test_every_record_once_per_epoch_in_a_new_order() -> None:
    epochs = [[i for b in _batches(_sampler(), epoch=e) for i in b] for e in range(3)]
    for order in epochs:
        assert sorted(order) == DATA
    assert epochs[0] != epochs[1] != epochs[2]
    assert [i for b in _batches(_sampler(), epoch=1) for i in b] == epochs[1], "seeded"
    unshuffled = [i for b in _batches(_sampler(shuffle=False)) for i in b]
    assert sorted(unshuffled) == DATA


def test_batches_are_more_uniform_than_random() -> None:
    grouped, plain = _batches(_sampler()), _batches(_sampler(grouped=False))
    assert _efficiency(grouped) > 0.75 and _efficiency(grouped) > _efficiency(plain) + 0.3
    assert max(LENGTHS[i] for i in grouped[0]) == max(LENGTHS), "the longest batch first"
    assert len(grouped[-1]) == N % 8, "the partial batch stays last"


def test_two_ranks_shard_the_global_batches() -> None:
    one = _batches(_sampler(batch=8), batch=8, epoch=2)
    two = [_batches(_sampler(ranks=2, rank=r, batch=4), batch=4, epoch=2) for r in (0, 1)]
    for step, global_batch in enumerate(one[:-1]):
        assert sorted(two[0][step] + two[1][step]) == sorted(global_batch)
    # each rank's batch holds records of similar length too
    assert _efficiency(two[0][:-1]) > 0.7


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_mid_epoch_neither_repeats_nor_skips(workers: int) -> None:
    def loader():
        return ResumableDataLoader(DATA, _sampler(), batch_size=8, num_workers=workers)

    full = loader()
    full.sampler.set_epoch(1)
    expected = [b.tolist() for b in full]
    first = loader()
    first.sampler.set_epoch(1)
    seen = [b.tolist() for b in itertools.islice(iter(first), 7)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    resumed.sampler.set_epoch(1)
    assert seen + [b.tolist() for b in resumed] == expected


def test_lengths_from_tokens_and_audio_headers(tmp_path: Path) -> None:
    write_wav(tmp_path / "one.wav", seconds=1.0)
    write_wav(tmp_path / "three.wav", seconds=2.5)
    records = [
        record("a", "Hi?", "yes"),
        record("b", "Tell me about the picture and the sound " * 5, "a long answer " * 5),
        record("c", "Hi?", "yes", audio="one.wav"),
        record("d", "Hi?", "yes", audio="three.wav"),
        record("e", "Hi?", "yes", audio="missing.wav"),
    ]
    keys = record_lengths(records, processor(), tmp_path, audio_bucket_seconds=1.0)
    assert keys[0][0] == 0 and keys[1][1] > keys[0][1] + 40
    assert keys[2][0] == 1 and keys[3][0] == 3 and keys[4][0] == 0
    assert keys[2][1] == keys[0][1]
    tokens_only = record_lengths(records, processor(), tmp_path, audio_bucket_seconds=None)
    assert [k[0] for k in tokens_only] == [0] * 5


def _world_efficiency(world: Path, sampler: str) -> float:
    module = ConversationDataModule(
        processor(), str(world / "train.jsonl"), batch_size=8, sampler=sampler, group_batches=4
    )
    module.setup("fit")
    loader = ResumableDataLoader(
        module.train_set, module.make_sampler(), batch_size=8, collate_fn=module.train_collator
    )
    loader.sampler.set_epoch(0)
    real = positions = 0
    for batch in loader:
        real += int(batch.attention_mask.sum())
        positions += batch.attention_mask.numel()
    return real / positions


def test_world_padding_efficiency_rises_and_is_logged(
    world_dir: Path, tmp_path: Path, compose_train
) -> None:
    grouped = _world_efficiency(world_dir, "length_grouped")
    plain = _world_efficiency(world_dir, "random")
    assert grouped > plain + 0.1, (grouped, plain)
    overrides = [o for o in tiny_train_overrides(world_dir, tmp_path) if "val_path" not in o]
    train(compose_train([*overrides, "data.val_path=null", "data.sampler=length_grouped"]))
    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        row = next(r for r in csv.DictReader(handle) if r.get("data/padding_efficiency"))
    assert 0.5 < float(row["data/padding_efficiency"]) <= 1.0
    assert float(row["data/skipped"]) == 0


def test_unknown_sampler_is_an_error(world_dir: Path) -> None:
    with pytest.raises(ValueError, match="data.sampler must be one of"):
        ConversationDataModule(processor(), str(world_dir / "train.jsonl"), sampler="bucket")
    assert json.loads((world_dir / "train.jsonl").read_text().splitlines()[0])["id"]
