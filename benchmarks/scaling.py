"""Scaling: training step time against the text length and against the number of media
tokens, on synthetic batches (random ids, pixels and waveforms of chosen sizes).

The media tokens are the encoders' output tokens the fusion reads: the image's (fixed by the
image size) plus the audio frames, which grow with the clip's length (wav2vec2: 50 per
second). A step is forward, backward and the AdamW update (the plain loop's step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import median, time_calls
from mmfuse.loss import next_token_loss
from mmfuse.model import MMFuseModel
from mmfuse.processing.text import IGNORE_INDEX
from mmfuse.types import Batch


def synthetic_batch(
    model: MMFuseModel,
    batch_size: int,
    text_tokens: int,
    audio_samples: int,
    image_size: int,
    prompt_tokens: int = 16,
    seed: int = 0,
) -> Batch:
    """A batch of random records, each with ``text_tokens`` tokens (the second half
    supervised), an image and an audio clip of ``audio_samples`` samples."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.decoder.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, text_tokens), generator=generator)
    labels = ids.clone()
    labels[:, : text_tokens // 2] = IGNORE_INDEX
    prompt = ids[:, : min(prompt_tokens, text_tokens)]
    return Batch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=labels,
        prompt_ids=prompt,
        prompt_mask=torch.ones_like(prompt),
        pixel_values=torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        has_image=torch.ones(batch_size, dtype=torch.bool),
        audio_values=0.1 * torch.randn(batch_size, audio_samples, generator=generator),
        audio_lengths=torch.full((batch_size,), audio_samples, dtype=torch.long),
        has_audio=torch.ones(batch_size, dtype=torch.bool),
        ids=[f"synthetic-{i}" for i in range(batch_size)],
    )


def media_tokens(model: MMFuseModel, batch: Batch) -> int:
    """Media tokens the fusion reads per record (image tokens + audio frames)."""
    total = 0
    with torch.no_grad():
        for _, encoder, args in _media_inputs(model, batch):
            total += encoder(*args).feats.shape[1]
    return total


def _media_inputs(model: MMFuseModel, batch: Batch):
    inputs = {
        "image": (batch.pixel_values[:1], batch.has_image[:1]),
        "audio": (batch.audio_values[:1], batch.audio_lengths[:1]),
    }
    for name, encoder in model.encoders.items():
        if name in inputs:
            yield name, encoder, inputs[name]


def train_step_fn(model: MMFuseModel, batch: Batch):
    """One training step on ``batch`` (plain PyTorch, AdamW with its defaults)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits, labels = model(batch)
        loss, _ = next_token_loss(logits, labels, batch.ids)
        loss.backward()
        optimizer.step()

    return step


@dataclass
class ScalingResult:
    text_tokens: list[int] = field(default_factory=list)
    text_step_s: list[float] = field(default_factory=list)
    media_tokens: list[int] = field(default_factory=list)
    media_step_s: list[float] = field(default_factory=list)
    batch_size: int = 0
    fixed_text: int = 0
    fixed_audio_s: float = 0.0


def measure_scaling(
    model: MMFuseModel,
    image_size: int,
    sample_rate: int,
    batch_size: int,
    text_lengths: Sequence[int],
    audio_seconds: Sequence[float],
    fixed_text: int,
    fixed_audio_s: float,
    warmup: int,
    repeats: int,
) -> ScalingResult:
    """Median step time for each text length (audio fixed) and each clip length (text
    fixed). The model's weights are restored afterwards."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = ScalingResult(
        batch_size=batch_size, fixed_text=fixed_text, fixed_audio_s=fixed_audio_s
    )
    fixed_samples = int(fixed_audio_s * sample_rate)
    for length in text_lengths:
        batch = synthetic_batch(model, batch_size, length, fixed_samples, image_size)
        result.text_tokens.append(length)
        result.text_step_s.append(median(time_calls(train_step_fn(model, batch), warmup, repeats)))
    for seconds in audio_seconds:
        batch = synthetic_batch(
            model, batch_size, fixed_text, int(seconds * sample_rate), image_size
        )
        result.media_tokens.append(media_tokens(model, batch))
        result.media_step_s.append(median(time_calls(train_step_fn(model, batch), warmup, repeats)))
    model.load_state_dict(state)
    return result


def plot(result: ScalingResult, path: str | Path) -> Path | None:
    """Writes the two curves to a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(result.text_tokens, [t * 1e3 for t in result.text_step_s], "o-")
    left.set_xlabel("text tokens per record")
    left.set_ylabel("training step (ms)")
    left.set_title(f"text length (audio {result.fixed_audio_s:g} s)")
    right.plot(result.media_tokens, [t * 1e3 for t in result.media_step_s], "o-")
    right.set_xlabel("media tokens per record (image + audio frames)")
    right.set_title(f"media tokens (text {result.fixed_text})")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        axis.set_ylim(bottom=0)
    fig.suptitle(f"mmfuse small preset, batch {result.batch_size}, fp32 CPU")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
