"""The bad-input policy on a corpus of deliberately broken inputs (tests/bad_corpus.py):
``error`` gives one clear error per case naming the file, the record and the reason; ``skip``
leaves bad records out (never replaced by others), counts them per reason at each epoch end,
trains on the good ones and stops when too many are bad. Input files are never modified."""

from __future__ import annotations

import csv
import hashlib
import itertools
import pickle
from pathlib import Path

import pytest
import torch
from bad_corpus import BAD_CASES, LONG_ID, N_GOOD, expected_counts, write_bad_corpus
from helpers import processor, supervised_text

from data_modules.conversation import ConversationDataset
from data_modules.monitor import TooManyBadRecords
from data_modules.sampler import ResumableDataLoader, ResumableSampler
from mmfuse.processing.collate import Collator
from mmfuse.processing.errors import RecordError
from mmfuse.train import train
from mmfuse.types import Sample, SkippedRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_bad_corpus(tmp_path_factory.mktemp("corpus"))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "data=jsonl",
        f"data.train_path={corpus}",
        f"data.val_path={corpus}",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        "data.on_bad_record=skip",
        "data.max_skip_fraction=0.5",
        f"paths.output_dir={out}",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null",
        "generation.max_new_tokens=4",
        *extra,
    ]


def test_error_names_file_record_and_reason_for_every_case(corpus: Path) -> None:
    dataset = ConversationDataset(corpus, processor(), on_bad_record="error")
    seen = set()
    for index, rec in enumerate(dataset.records):
        if rec["id"] not in BAD_CASES:
            assert isinstance(dataset[index], Sample)
            continue
        reason, media = BAD_CASES[rec["id"]]
        with pytest.raises(RecordError) as info:
            dataset[index]
        message = str(info.value)
        assert message.startswith(f"{corpus}: record {rec['id']!r}: {reason}"), message
        assert info.value.reason == reason and info.value.record_id == rec["id"]
        if media is not None:
            assert media in message, message
        seen.add(rec["id"])
    assert seen == set(BAD_CASES)


def test_skip_leaves_bad_records_out_without_replacing_them(corpus: Path) -> None:
    dataset = ConversationDataset(corpus, processor(), on_bad_record="skip")
    items = [dataset[i] for i in range(len(dataset))]
    skipped = [item for item in items if isinstance(item, SkippedRecord)]
    assert {s.id: s.reason for s in skipped} == {k: v[0] for k, v in BAD_CASES.items()}
    assert all(s.source == str(corpus) for s in skipped)
    collate = Collator(processor().tokenizer.pad_token_id)
    batches = [collate(items[i : i + 8]) for i in range(0, len(items), 8)]
    ids = [i for b in batches for i in b.ids]
    assert len(ids) == len(set(ids)) == N_GOOD, "every good record once, no stand-ins"
    assert sum(len(b.skipped) for b in batches) == len(BAD_CASES)
    assert any(len(b) < 8 for b in batches[:-1]), "a batch with a bad record comes out smaller"


def test_long_conversation_loses_its_oldest_turns_not_its_answer(corpus: Path) -> None:
    dataset = ConversationDataset(corpus, processor(), on_bad_record="error")
    index = next(i for i, r in enumerate(dataset.records) if r["id"] == LONG_ID)
    sample = dataset[index]
    assert sample.truncated_turns > 0 and len(sample.input_ids) <= 256
    tok = processor().tokenizer
    assert supervised_text(tok, sample.labels.tolist()).endswith("red<|im_end|>")
    assert "Describe the picture" not in tok.decode(sample.input_ids)
    assert sample.image is None, "the dropped turn's image is not loaded"


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_trains_on_good_records_and_logs_counts_per_reason(
    corpus: Path, tmp_path: Path, compose_train, workers: int
) -> None:
    """Counted in the main process also when worker processes (persistent) skip them."""
    before = _digests(corpus.parent)
    metrics = train(compose_train(_overrides(corpus, tmp_path, f"data.num_workers={workers}")))
    assert metrics["train/loss"] > 0 and (tmp_path / "model" / "model.safetensors").is_file()
    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    train_row = next(r for r in rows if r.get("data/skipped"))
    val_row = next(r for r in rows if r.get("val_data/skipped"))
    for row, prefix in ((train_row, "data"), (val_row, "val_data")):
        assert float(row[f"{prefix}/skipped"]) == len(BAD_CASES)
        for reason, count in expected_counts().items():
            assert float(row[f"{prefix}/skipped/{reason.replace(' ', '_')}"]) == count, reason
        assert float(row[f"{prefix}/truncated"]) == 1
    total = N_GOOD + len(BAD_CASES)
    assert float(train_row["data/skipped_fraction"]) == pytest.approx(len(BAD_CASES) / total)
    assert 0 < float(train_row["data/padding_efficiency"]) <= 1
    assert _digests(corpus.parent) == before, "input files are never modified"


def test_error_policy_stops_training_naming_the_record(
    corpus: Path, tmp_path: Path, compose_train
) -> None:
    cfg = compose_train(_overrides(corpus, tmp_path, "data.on_bad_record=error"))
    with pytest.raises(RecordError) as info:
        train(cfg)
    assert info.value.record_id in BAD_CASES
    assert str(corpus) in str(info.value) and info.value.reason in str(info.value)


def test_too_many_bad_records_stop_training(corpus: Path, tmp_path: Path, compose_train) -> None:
    cfg = compose_train(_overrides(corpus, tmp_path, "data.max_skip_fraction=0.1"))
    with pytest.raises(TooManyBadRecords, match=r"max_skip_fraction=0.1") as info:
        train(cfg)
    assert "records skipped as bad" in str(info.value)


def _epochs(dataset, workers: int, epochs: int = 2, persistent: bool = True) -> list[list[tuple]]:
    sampler = ResumableSampler(dataset, seed=1)
    loader = ResumableDataLoader(
        dataset,
        sampler,
        batch_size=8,
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        collate_fn=Collator(processor().tokenizer.pad_token_id),
    )
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append([(tuple(b.ids), tuple(s.id for s in b.skipped)) for b in loader])
    return out


def test_datasets_pickle_and_two_persistent_workers_match_one_process(corpus: Path) -> None:
    dataset = ConversationDataset(corpus, processor(), on_bad_record="skip", augment=True)
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(copy) == len(dataset) and copy[0].id == dataset[0].id
    assert torch.equal(copy[0].input_ids, dataset[0].input_ids)
    one, two = _epochs(dataset, 0), _epochs(dataset, 2)
    assert one == two
    assert one[0] != one[1], "a new order in the second epoch (persistent workers too)"
    for epoch in one:
        ids = list(itertools.chain.from_iterable(i for i, _ in epoch))
        assert sorted(ids) == sorted(r["id"] for r in dataset.records if r["id"] not in BAD_CASES)


def test_error_in_a_worker_process_keeps_type_and_message(corpus: Path) -> None:
    dataset = ConversationDataset(corpus, processor(), on_bad_record="error")
    with pytest.raises(RecordError, match=r"record 'bad-[a-z-]+': "):
        _epochs(dataset, 2, epochs=1, persistent=False)
    error = RecordError("f.jsonl", "r1", "image file not found: x.png", "missing file")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.reason == "missing file"
