"""Samples -> Batch.

Items may be ``SkippedRecord``s (``data.on_bad_record=skip``): they are left out of the batch
and listed in ``Batch.skipped``, so a batch can have fewer rows than were asked for, or none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmfuse.processing.text import IGNORE_INDEX
from mmfuse.types import Batch, EncoderFeatures, Sample, SkippedRecord


def pad_sequences(
    seqs: Sequence[torch.Tensor], value: float | int, side: str = "right"
) -> torch.Tensor:
    """Stacks 1-D tensors into (B, max_len), padding on ``side`` with ``value``."""
    length = max((s.shape[0] for s in seqs), default=0)
    dtype = seqs[0].dtype if seqs else torch.long
    out = torch.full((len(seqs), max(length, 1)), value, dtype=dtype)
    for row, seq in enumerate(seqs):
        n = seq.shape[0]
        if n:
            if side == "right":
                out[row, :n] = seq
            else:
                out[row, out.shape[1] - n :] = seq
    return out


class Collator:
    """Pads a list of samples into a ``Batch``.

    Args:
        pad_id: token id used for padding.
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.
        image_size: side of the pixel tensor for records without an image.
    """

    def __init__(self, pad_id: int, padding_side: str = "right", image_size: int = 64) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.image_size = image_size

    def __call__(self, items: Sequence[Sample | SkippedRecord]) -> Batch:
        samples = [s for s in items if not isinstance(s, SkippedRecord)]
        side = self.padding_side
        input_ids = pad_sequences([s.input_ids for s in samples], self.pad_id, side)
        attention_mask = pad_sequences([torch.ones_like(s.input_ids) for s in samples], 0, side)
        labels = pad_sequences([s.labels for s in samples], IGNORE_INDEX, side)
        prompt_ids = pad_sequences([s.prompt_ids for s in samples], self.pad_id)
        prompt_mask = pad_sequences([torch.ones_like(s.prompt_ids) for s in samples], 0)
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            **self._images(samples),
            **self._audio(samples),
            ids=[s.id for s in samples],
            tasks=[s.task for s in samples],
            references=[s.reference for s in samples],
            all_references=[s.all_references for s in samples],
            features=self._features(samples),
            audio_chunk=max((s.audio_chunk for s in samples), default=0),
            skipped=[s for s in items if isinstance(s, SkippedRecord)],
            truncated=sum(s.truncated_turns > 0 for s in samples),
        )

    def _images(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        shapes = {tuple(s.image.shape) for s in samples if s.image is not None}
        shape = shapes.pop() if len(shapes) == 1 else (3, self.image_size, self.image_size)
        if shapes:
            raise ValueError(f"images of different shapes in one batch: {sorted(shapes)}")
        pixels = torch.zeros((len(samples), *shape))
        for row, sample in enumerate(samples):
            if sample.image is not None:
                pixels[row] = sample.image
        has_image = [s.image is not None or "image" in s.features for s in samples]
        return {"pixel_values": pixels, "has_image": torch.tensor(has_image, dtype=torch.bool)}

    def _audio(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        waves = [s.audio if s.audio is not None else torch.zeros(0) for s in samples]
        has_audio = [s.audio is not None or "audio" in s.features for s in samples]
        return {
            "audio_values": pad_sequences(waves, 0.0),
            "audio_lengths": torch.tensor([w.shape[0] for w in waves], dtype=torch.long),
            "has_audio": torch.tensor(has_audio, dtype=torch.bool),
        }

    def _features(self, samples: Sequence[Sample]) -> dict[str, EncoderFeatures]:
        """Cached encoder features per modality: (B, N, D') padded, mask, present rows."""
        out: dict[str, EncoderFeatures] = {}
        for kind in sorted({k for s in samples for k in s.features}):
            rows = [s.features.get(kind) for s in samples]
            raw = [s for s in samples if getattr(s, kind) is not None]
            if raw:
                raise ValueError(
                    f"a batch mixes cached {kind} features with loaded {kind} inputs "
                    f"(records {[s.id for s in raw][:3]})"
                )
            width = next(r.shape[-1] for r in rows if r is not None)
            dtype = next(r.dtype for r in rows if r is not None)
            longest = max((r.shape[0] for r in rows if r is not None), default=0)
            feats = torch.zeros((len(samples), max(longest, 1), width), dtype=dtype)
            mask = torch.zeros(feats.shape[:2], dtype=torch.bool)
            for row, value in enumerate(rows):
                if value is not None and value.shape[0]:
                    feats[row, : value.shape[0]] = value
                    mask[row, : value.shape[0]] = True
            present = torch.tensor([r is not None for r in rows], dtype=torch.bool)
            out[kind] = EncoderFeatures(feats, mask, present)
        return out
