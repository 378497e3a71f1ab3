"""Shared helpers for the mmfuse unit tests: tokenizer, tiny model, media files and records."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from transformers import Wav2Vec2Config

import mmfuse.config
from data_modules import world
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import build_processor_and_model, load_processor_dir
from mmfuse.processing.audio import AudioProcessor
from mmfuse.processing.collate import Collator
from mmfuse.processing.image import ImageProcessor
from mmfuse.processing.processor import Processor
from mmfuse.processing.text import build_bpe_tokenizer
from mmfuse.types import Batch, Sample

IMAGE_SIZE = 64
SAMPLE_RATE = 16000


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Runs torch on ``n`` CPU threads, then restores the previous number.

    The test models are tiny: one thread is as fast as two on an idle machine and avoids the
    large slow-down of busy-waiting OpenMP threads when another process is using the cores.
    Test modules use it in an autouse, module-scoped fixture.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The tokenizer trained on the built-in world's vocabulary (built once per session).

    Shared between tests: do not modify it (build a fresh one to change the template).
    """
    return fresh_tokenizer()


def fresh_tokenizer():
    """A newly trained tokenizer, safe to modify."""
    return build_bpe_tokenizer(world.vocabulary_corpus(), vocab_size=512)


def processor(max_length: int = 256) -> Processor:
    """A processor with the shared tokenizer and the world's media settings."""
    return Processor(
        tokenizer(),
        ImageProcessor(size=IMAGE_SIZE),
        AudioProcessor(sample_rate=SAMPLE_RATE, max_seconds=10.0),
        max_length=max_length,
    )


def compose_cfg(output_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The training config composed with ``model=tiny`` (plus ``overrides``)."""
    with initialize_config_dir(config_dir=mmfuse.config.CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=["model=tiny", f"paths.output_dir={output_dir}", *overrides],
        )


def build_tiny(
    output_dir: str | Path, seed: int = 0, overrides: Sequence[str] = ()
) -> tuple[Processor, MMFuseModel, DictConfig]:
    """Builds processor and tiny model from the real config with a fixed seed."""
    cfg = compose_cfg(output_dir, overrides)
    torch.manual_seed(seed)
    proc, model = build_processor_and_model(cfg)
    return proc, model, cfg


# ----------------------------------------------------------------------------- audio encoder

TINY_W2V = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    conv_dim=[8, 8, 8],
    conv_kernel=[10, 8, 8],
    conv_stride=[5, 8, 8],
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    apply_spec_augment=False,
    mask_time_prob=0.0,
    layerdrop=0.0,
)
"""A tiny wav2vec2-family config (320x down-sampling): ``Wav2Vec2Config(**TINY_W2V)``."""


def tiny_w2v_config(**overrides) -> Wav2Vec2Config:
    """A tiny ``Wav2Vec2Config`` with a LayerNorm front end, ``overrides`` applied."""
    settings = {"feat_extract_norm": "layer", "do_stable_layer_norm": True, **TINY_W2V}
    return Wav2Vec2Config(**{**settings, **overrides})


# ----------------------------------------------------------------------------- media


def write_png(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: int = 64) -> Path:
    """A ``size`` x ``size`` PNG: a filled circle of ``color`` on a grey background."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    array = np.full((size, size, 3), 128, dtype=np.uint8)
    array[inside] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def sine(freq: float, seconds: float = 1.0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A float32 sine wave with amplitude 0.5."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(
    path: Path,
    freq: float = 440.0,
    seconds: float = 1.0,
    rate: int = SAMPLE_RATE,
    channels: int = 1,
) -> Path:
    """A sine WAV file (``channels`` identical channels)."""
    wave = sine(freq, seconds, rate)
    data = wave if channels == 1 else np.stack([wave] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate)
    return path


# ----------------------------------------------------------------------------- records


def record(
    record_id: str,
    question: str,
    answer: str,
    image: str | None = None,
    audio: str | None = None,
    task: str = "test/task",
) -> dict:
    """A one-turn conversation record; media paths are relative to the base directory."""
    content: list[dict] = []
    if image is not None:
        content.append({"type": "image", "path": image})
    if audio is not None:
        content.append({"type": "audio", "path": audio})
    content.append({"type": "text", "text": question})
    return {
        "id": record_id,
        "task": task,
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


def write_media(base: Path) -> None:
    """Writes ``a.png`` (red circle), ``b.png`` (blue circle), ``s.wav`` (1 s, 440 Hz) and
    ``t.wav`` (0.5 s, 880 Hz) into ``base``."""
    write_png(base / "a.png", (255, 0, 0))
    write_png(base / "b.png", (0, 0, 255))
    write_wav(base / "s.wav", 440.0, 1.0)
    write_wav(base / "t.wav", 880.0, 0.5)


def mixed_records() -> list[dict]:
    """Text-only, image-only, audio-only and image+audio records (media from write_media)."""
    return [
        record("text", "Say yes.", "yes", task="text/yes"),
        record("img", "What color is the circle?", "red", image="a.png", task="image/color"),
        record(
            "aud", "Is the sound low, middle or high?", "middle", audio="s.wav", task="audio/pitch"
        ),
        record(
            "both",
            "How many shapes and beeps are there together?",
            "two",
            image="b.png",
            audio="t.wav",
            task="both/total",
        ),
    ]


def samples(
    proc: Processor, records: Sequence[dict], base: Path, for_generation: bool = False
) -> list[Sample]:
    return [proc(r, base, source="test.jsonl", for_generation=for_generation) for r in records]


def collate(
    proc: Processor,
    records: Sequence[dict],
    base: Path,
    side: str = "right",
    for_generation: bool = False,
) -> Batch:
    """Processes and collates ``records``."""
    collator = Collator(proc.tokenizer.pad_token_id, side, proc.image.size)
    return collator(samples(proc, records, base, for_generation))


def supervised_text(tok, labels: Sequence[int]) -> str:
    """Decodes the supervised label ids (those that are not -100)."""
    return tok.decode([int(x) for x in labels if int(x) != -100])


MEMORISED_ANSWERS = ["yes", "a red circle", "middle", "two shapes and one beep"]


def train_to_memorise(
    tmp_path_factory, steps: int = 60, snapshot_at: int | None = None
) -> tuple[Processor, MMFuseModel, MMFuseModel | None, Batch, list[dict], Path]:
    """The tiny model trained ``steps`` full-batch steps on the four mixed records, whose
    answers (``MEMORISED_ANSWERS``, of different lengths) it then reproduces.

    Returns:
        processor, the trained model (eval mode), an eval-mode copy taken before step
        ``snapshot_at`` (or None), left-padded generation prompts, the records, media dir.
    """
    from mmfuse.loss import next_token_loss

    base = tmp_path_factory.mktemp("media")
    write_media(base)
    records = mixed_records()
    for rec, answer in zip(records, MEMORISED_ANSWERS, strict=True):
        rec["messages"][1]["content"][0]["text"] = answer
    proc, model, _ = build_tiny(tmp_path_factory.mktemp("out"), seed=0)
    batch = collate(proc, records, base)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    snapshot = None
    for step in range(steps):
        if step == snapshot_at:
            snapshot = copy.deepcopy(model).eval()
        optimizer.zero_grad()
        loss, _ = next_token_loss(*model(batch))
        loss.backward()
        optimizer.step()
    model.eval()
    prompts = collate(proc, records, base, side="left", for_generation=True)
    return proc, model, snapshot, prompts, records, base


def world_media(world: Path) -> tuple[Path, Path]:
    """The image and audio files of the first both/* test record of a generated world."""
    record = next(
        json.loads(line)
        for line in (world / "test.jsonl").read_text().splitlines()
        if json.loads(line)["task"].startswith("both/")
    )
    parts = record["messages"][0]["content"]
    return world / parts[0]["path"], world / parts[1]["path"]


def world_prompt(model_dir: Path, world: Path, text: str, audio: bool = False) -> Sample:
    """``text`` about the image (and with ``audio`` the clip) of ``world_media``, processed
    for generation by the processor of ``model_dir``."""
    image_path, audio_path = world_media(world)
    content = [{"type": "image", "path": str(image_path)}]
    content += [{"type": "audio", "path": str(audio_path)}] if audio else []
    content.append({"type": "text", "text": text})
    return load_processor_dir(model_dir).prompt([{"role": "user", "content": content}])


def assert_skipped_without_autograd(encoder: torch.nn.Module, *inputs: torch.Tensor) -> None:
    """``inputs`` carry the encoder's modality in no record: without autograd the backbone
    must not run and one masked zero token per record comes back; with autograd the
    dummy row runs (every parameter in the step)."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda *_: calls.append(1)) for m in encoder.backbone.modules()
    ]
    try:
        with torch.no_grad():
            out = encoder(*inputs)
        assert calls == []
        batch = inputs[0].shape[0]
        assert out.feats.shape == (batch, 1, encoder.proj.out_features)
        assert not out.feats.any() and not out.mask.any()
        encoder(*inputs)
        assert calls
    finally:
        for hook in hooks:
            hook.remove()
