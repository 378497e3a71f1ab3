"""Tests of data_modules.sample_cache and of the data sets that keep processed samples."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from helpers import mixed_records, processor, record, write_media

from data_modules.conversation import ConversationDataModule, ConversationDataset
from data_modules.sample_cache import SampleCache, sample_bytes
from mmfuse.processing.image import ImageProcessor
from mmfuse.types import Sample, SkippedRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingProcessor:
    """Wraps a processor and counts its calls."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_media(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed_records()))
    return path


def _equal(a: Sample, b: Sample) -> bool:
    for field in fields(Sample):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is None or y is None or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_sample_bytes_counts_every_tensor(corpus: Path) -> None:
    sample = ConversationDataset(corpus, processor())[3]  # image and audio
    expected = (
        sample.input_ids.numel() * 8
        + sample.labels.numel() * 8
        + sample.prompt_ids.numel() * 8
        + 3 * 64 * 64 * 4
        + 8000 * 4  # t.wav: 0.5 s at 16 kHz
    )
    assert sample_bytes(sample) == expected


def test_later_epochs_hand_out_the_kept_samples_without_processing(corpus: Path) -> None:
    plain = ConversationDataset(corpus, processor())
    counting = CountingProcessor(processor())
    cached = ConversationDataset(corpus, counting, sample_cache_mb=1)
    first = [cached[i] for i in range(4)]
    assert counting.calls == 4 and len(cached.cache) == 4
    order = (3, 1, 0, 2)
    for _ in range(2):
        again = [cached[i] for i in order]
        assert counting.calls == 4, "no record is processed twice"
        assert all(a is first[i] for a, i in zip(again, order, strict=True))
    assert all(_equal(cached[i], plain[i]) for i in range(4))
    assert (cached.cache.hits, cached.cache.misses) == (12, 4)
    assert cached.cache.used_bytes == sum(sample_bytes(s) for s in first)


def test_no_budget_keeps_nothing(corpus: Path) -> None:
    counting = CountingProcessor(processor())
    data = ConversationDataset(corpus, counting)
    for _ in range(2):
        [data[i] for i in range(4)]
    assert counting.calls == 8 and len(data.cache) == 0


def test_samples_past_the_budget_are_made_anew_each_time(corpus: Path) -> None:
    plain = ConversationDataset(corpus, processor())
    sizes = [sample_bytes(plain[i]) for i in range(4)]
    budget = sizes[0] + sizes[1]  # the text and image samples fit, the audio ones not
    counting = CountingProcessor(processor())
    data = ConversationDataset(corpus, counting, sample_cache_mb=budget / 2**20)
    for _ in range(3):
        got = [data[i] for i in range(4)]
    assert len(data.cache) == 2 and data.cache.used_bytes == budget <= data.cache.max_bytes
    assert counting.calls == 4 + 2 * 2  # records 2 and 3 are processed every epoch
    assert all(_equal(g, p) for g, p in zip(got, [plain[i] for i in range(4)], strict=True))


def test_augmented_training_samples_are_never_kept(tmp_path: Path) -> None:
    write_media(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record("i", "What color?", "red", image="a.png")) + "\n")
    proc = processor()
    proc.image = ImageProcessor(64, augment={"random_resized_crop": {"scale": [0.3, 0.6]}})
    data = ConversationDataset(path, proc, augment=True, sample_cache_mb=16)
    index = type("EpochIndex", (int,), {})  # the sampler's indices carry their epoch

    def drawn(epoch: int) -> torch.Tensor:
        i = index(0)
        i.epoch = epoch
        return data[i].image

    assert not torch.equal(drawn(0), drawn(1)), "each epoch gets its own augmentation"
    assert torch.equal(drawn(0), drawn(0)) and len(data.cache) == 0


def test_bad_records_are_not_kept(tmp_path: Path) -> None:
    write_media(tmp_path)
    path = tmp_path / "data.jsonl"
    rows = [record("good", "What color?", "red", image="a.png")]
    rows.append(record("gone", "What color?", "red", image="missing.png"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipping = ConversationDataset(path, processor(), on_bad_record="skip", sample_cache_mb=16)
    for _ in range(2):
        skipped = skipping[1]
        assert isinstance(skipped, SkippedRecord) and skipped.id == "gone"
    assert isinstance(skipping[0], Sample) and len(skipping.cache) == 1
    strict = ConversationDataset(path, processor(), sample_cache_mb=16)
    for _ in range(2):  # the error comes every time, naming the record
        with pytest.raises(Exception, match="gone"):
            strict[1]


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 0"):
        SampleCache(-1)


def test_the_data_module_gives_every_data_set_the_budget(corpus: Path) -> None:
    module = ConversationDataModule(processor(), str(corpus), str(corpus), sample_cache_mb=2)
    module.setup("fit")
    for data in (module.train_set, module.val_set, module.val_generate_set):
        assert data.cache.max_bytes == 2 * 2**20
    sample = module.train_set[0]
    assert len(module.train_set.cache) == 1
    module.train_set.cache.clear()
    assert len(module.train_set.cache) == 0 and module.train_set.cache.used_bytes == 0
    assert module.train_set[0] is not sample
