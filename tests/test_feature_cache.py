"""Frozen-encoder feature cache: computed once, keyed by the encoder weights and the
preprocessing, read instead of running the encoders with the same loss and gradients; refused
for trainable encoders and training augmentation; shared over ranks; bad media recorded."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import build_tiny, mixed_records, write_media, write_wav

from data_modules.conversation import ConversationDataset
from mmfuse import feature_cache
from mmfuse.feature_cache import build_store, cache_key, check_cacheable
from mmfuse.freezing import apply_freezing
from mmfuse.loss import next_token_loss
from mmfuse.processing.audio import AudioProcessor
from mmfuse.processing.collate import Collator
from mmfuse.processing.image import ImageProcessor
from mmfuse.processing.processor import Processor
from mmfuse.train import train
from mmfuse.types import SkippedRecord
from tests.conftest import tiny_train_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKBONES = {"encoders": {k: {"patterns": ["backbone\\..*"]} for k in ("image", "audio")}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    proc, model, _ = build_tiny(tmp_path_factory.mktemp("out"), seed=0)
    apply_freezing(model, BACKBONES)
    return proc, model


def _data(base: Path, records: list[dict] | None = None) -> Path:
    write_media(base)
    records = records or mixed_records() * 2
    for i, rec in enumerate(records):
        rec = records[i] = json.loads(json.dumps(rec))
        rec["id"] = f"{rec['id']}-{i}"
    (base / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return base / "d.jsonl"


def _batch(dataset, collator):
    return collator([dataset[i] for i in range(len(dataset))])


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = next_token_loss(*model(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _compare_cached(proc, model, path: Path, cache: Path) -> None:
    plain = ConversationDataset(path, proc)
    cached = ConversationDataset(path, proc)
    model.train()  # frozen backbones in eval mode, the rest training
    modes = [m.training for m in model.modules()]
    cached.features = build_store(cached.records, path.parent, model, proc, cache)
    assert [m.training for m in model.modules()] == modes, "the fill leaves every mode as it was"
    collator = Collator(proc.tokenizer.pad_token_id, "right", proc.image.size)
    raw, fast = _batch(plain, collator), _batch(cached, collator)
    assert set(fast.features) == {"image", "audio"} and not raw.features
    assert torch.equal(fast.has_image, raw.has_image) and torch.equal(fast.has_audio, raw.has_audio)
    assert not fast.audio_values.any() and not fast.pixel_values.any(), "no media decoded"
    model.train()
    torch.manual_seed(0)
    loss_raw, grads_raw = _loss_and_grads(model, raw)
    torch.manual_seed(0)
    loss_fast, grads_fast = _loss_and_grads(model, fast)
    assert abs(float(loss_raw) - float(loss_fast)) < 1e-5
    assert grads_raw.keys() == grads_fast.keys()
    assert any(name.startswith("encoders.image.proj") for name in grads_fast), "proj trains"
    for name, grad in grads_raw.items():
        assert torch.allclose(grad, grads_fast[name], atol=1e-5), name


def test_cached_step_equals_encoder_step(tiny, tmp_path: Path) -> None:
    proc, model = tiny
    _compare_cached(proc, model, _data(tmp_path / "data"), tmp_path / "cache")


def test_chunked_long_audio_cached_equals_encoded(tiny, tmp_path: Path) -> None:
    base_proc, model = tiny
    audio = AudioProcessor(16000, max_seconds=0.4, long_audio="chunk", max_chunks=3)
    proc = Processor(base_proc.tokenizer, base_proc.image, audio)
    base = tmp_path / "data"
    write_wav(base / "long.wav", seconds=1.1)
    records = mixed_records()
    records[2]["messages"][0]["content"][0]["path"] = "long.wav"
    path = _data(base, records)
    sample = ConversationDataset(path, proc)[2]
    assert sample.audio.shape == (int(16000 * 1.1),) and sample.audio_chunk == 6400
    _compare_cached(proc, model, path, tmp_path / "cache")


def test_computed_once_then_read(tiny, tmp_path: Path, monkeypatch) -> None:
    proc, model = tiny
    path = _data(tmp_path / "data")
    records = ConversationDataset(path, proc).records
    fills = []
    real_fill = feature_cache._fill
    monkeypatch.setattr(
        feature_cache, "_fill", lambda *a, **k: fills.append(a[2]) or real_fill(*a, **k)
    )
    first = build_store(records, path.parent, model, proc, tmp_path / "cache")
    assert sorted(fills) == ["audio", "image"]
    again = build_store(records, path.parent, model, proc, tmp_path / "cache")
    assert sorted(fills) == ["audio", "image"], "the second build reads the files"
    for index in range(len(records)):
        a, b = first.get(index), again.get(index)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.get(0) == {}, "a text-only record has no features"
    assert len(list((tmp_path / "cache").glob("image-*/*/part-*.safetensors"))) == 1
    # an edited media file makes a new data digest: recomputed
    write_media(path.parent)
    (path.parent / "a.png").touch()
    build_store(records, path.parent, model, proc, tmp_path / "cache")
    assert len(fills) == 4


def test_key_follows_weights_and_preprocessing_not_the_projection(tiny) -> None:
    proc, model = tiny
    encoder = copy.deepcopy(model.encoders["image"])
    settings = proc.image.settings()
    key = cache_key(encoder, settings)
    assert cache_key(encoder, dict(settings)) == key
    with torch.no_grad():
        encoder.proj.weight.add_(1.0)  # the projection is applied after the cache
    assert cache_key(encoder, settings) == key
    assert cache_key(encoder, ImageProcessor(64, mean=(0.4, 0.4, 0.4)).settings()) != key
    assert cache_key(encoder, ImageProcessor(64, resize="shortest_edge").settings()) != key
    with torch.no_grad():
        next(encoder.backbone.parameters()).add_(1e-3)
    assert cache_key(encoder, settings) != key
    audio = model.encoders["audio"]
    assert cache_key(audio, AudioProcessor(16000).settings()) != cache_key(
        audio, AudioProcessor(16000, normalize="peak").settings()
    )


def test_refused_for_trainable_encoders_and_augmentation(tiny, tmp_path: Path) -> None:
    proc, model = tiny
    trainable = copy.deepcopy(model)
    next(trainable.encoders["audio"].backbone.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match=r"encoders.audio is not frozen.*freeze=encoders"):
        check_cacheable(trainable, proc)
    augmented = Processor(
        proc.tokenizer, ImageProcessor(64, augment={"horizontal_flip": 0.5}), proc.audio
    )
    with pytest.raises(ValueError, match=r"augmentation \(processor.image.augment=.*change every"):
        check_cacheable(model, augmented)
    from data_modules.conversation import ConversationDataModule

    with pytest.raises(ValueError, match="cannot be computed once"):
        ConversationDataModule(augmented, str(tmp_path / "x.jsonl"), cache_features=True)


def test_bad_media_are_recorded_and_skipped(tiny, tmp_path: Path) -> None:
    proc, model = tiny
    records = mixed_records()
    records[1]["messages"][0]["content"][0]["path"] = "nope.png"
    path = _data(tmp_path / "data", records)
    dataset = ConversationDataset(path, proc, on_bad_record="skip")
    dataset.features = build_store(dataset.records, path.parent, model, proc, tmp_path / "c")
    item = dataset[1]
    assert isinstance(item, SkippedRecord) and item.reason == "missing file"
    assert "nope.png" in item.detail and item.id == dataset.records[1]["id"]


def test_ranks_share_the_work(tiny, tmp_path: Path) -> None:
    proc, model = tiny
    path = _data(tmp_path / "data")
    records = ConversationDataset(path, proc).records
    one = build_store(records, path.parent, model, proc, tmp_path / "one")
    for kind in ("image", "audio"):  # rank 1 of 2 finishes first, then rank 0 builds
        key = cache_key(model.encoders[kind], getattr(proc, kind).settings())
        directory = (
            tmp_path / "two" / f"{kind}-{key}" / feature_cache.data_digest(records, path.parent)
        )
        feature_cache._fill(
            records, path.parent, kind, model.encoders[kind], proc, directory, 1, 2, 4, 0
        )
    two = build_store(records, path.parent, model, proc, tmp_path / "two", rank=0, ranks=2)
    for index in range(len(records)):
        a, b = one.get(index), two.get(index)
        assert a.keys() == b.keys()
        for kind in a:
            assert torch.allclose(a[kind], b[kind], atol=1e-6)


def _first_loss(run: Path) -> float:
    with (run / "csv" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    return float(min(rows, key=lambda r: int(r["step"]))["train/loss"])


def test_training_with_the_cache(world_dir: Path, tmp_path: Path, compose_train) -> None:
    losses = []
    for name, cache in (("plain", "false"), ("cached", "true")):
        overrides = tiny_train_overrides(world_dir, tmp_path / name)
        extra = ["freeze=encoders", "trainer.max_steps=2", f"data.cache_features={cache}"]
        cfg = compose_train([*overrides, *extra, f"data.cache_dir={tmp_path / 'fc'}"])
        train(cfg)
        losses.append(_first_loss(tmp_path / name))
    assert abs(losses[0] - losses[1]) < 1e-5, losses
    assert list((tmp_path / "fc").glob("image-*/*/done-000-of-001.json"))
    assert list((tmp_path / "fc").glob("audio-*/*/done-000-of-001.json"))
