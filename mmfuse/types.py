"""The containers passed between pipeline stages.

record -> ``Sample`` -> collate -> ``Batch`` -> encoders -> ``ModalityTokens`` -> fusion
-> ``Memory`` -> decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch

MODALITIES: tuple[str, ...] = ("image", "audio")


@dataclass
class Sample:
    """One processed conversation record.

    Attributes:
        id: record id.
        task: record task label (e.g. ``"image/color"``); ``""`` when absent.
        input_ids: (T,) token ids of the rendered chat template.
        labels: (T,) the ids where the loss applies, ``-100`` elsewhere.
        prompt_ids: (P,) ids of the user text only, for the optional text encoder.
        image: (3, H, W) normalised pixels, or None.
        audio: (S,) mono waveform at the encoder's sampling rate, or None.
        reference: the last assistant answer when processed for generation.
        all_references: every acceptable answer when processed for generation: the record's
            optional top-level ``"references"`` list, else ``[reference]``.
        features: per modality, cached encoder features (N, D') used instead of the media
            (``mmfuse.feature_cache``); the modality's ``image``/``audio`` is then None.
        audio_chunk: samples per window the audio encoder sees separately (0: the whole clip).
        truncated_turns: messages dropped from the start to fit ``max_length``.
    """

    id: str
    task: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_ids: torch.Tensor
    image: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    reference: str | None = None
    all_references: list[str] | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    audio_chunk: int = 0
    truncated_turns: int = 0


class SkippedRecord(NamedTuple):
    """A record left out under ``data.on_bad_record=skip``, in place of its ``Sample``.

    id: record id; source: its file; reason: one of ``processing.errors.REASONS``;
    detail: the error message.
    """

    id: str
    source: str
    reason: str
    detail: str


class EncoderFeatures(NamedTuple):
    """Cached encoder features of a batch for one modality, before the encoder's projection.

    feats (B, N, D'), mask (B, N) True where a token is real, present (B,) records that have
    the modality.
    """

    feats: torch.Tensor
    mask: torch.Tensor
    present: torch.Tensor


@dataclass
class Batch:
    """A padded batch of samples (B records).

    Attributes:
        input_ids: (B, T) token ids, padded with the pad id.
        attention_mask: (B, T) 1 for real tokens.
        labels: (B, T) supervised ids, -100 elsewhere.
        prompt_ids: (B, P) user-text ids for the text encoder, padded.
        prompt_mask: (B, P) 1 for real prompt tokens.
        pixel_values: (B, 3, H, W) pixels, zeros where a record has no image.
        has_image: (B,) bool.
        audio_values: (B, S) waveforms, zero-padded; zeros where a record has no audio.
        audio_lengths: (B,) valid samples per waveform (0 without audio).
        has_audio: (B,) bool.
        ids, tasks, references: per-record metadata (``references``: the last assistant
            answers).
        all_references: per record, every acceptable answer (``Sample.all_references``).
        features: per modality, cached encoder features that ``MMFuseModel.encode`` projects
            instead of running the encoder (``mmfuse.encoding.run_encoder``).
        audio_chunk: samples per window the audio encoder sees separately (0: whole clips).
        skipped: records of this batch left out as bad (``data.on_bad_record=skip``).
        truncated: records of this batch whose oldest turns were dropped to fit.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    pixel_values: torch.Tensor
    has_image: torch.Tensor
    audio_values: torch.Tensor
    audio_lengths: torch.Tensor
    has_audio: torch.Tensor
    ids: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    references: list[str | None] = field(default_factory=list)
    all_references: list[list[str] | None] = field(default_factory=list)
    features: dict[str, EncoderFeatures] = field(default_factory=dict)
    audio_chunk: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    truncated: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """Moves every tensor field (and the cached features) to ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        moved["features"] = {
            name: EncoderFeatures(*(t.to(device) for t in value))
            for name, value in self.features.items()
        }
        return replace(self, **moved)


class ModalityTokens(NamedTuple):
    """An encoder's output for a whole batch.

    feats: (B, N, D) tokens in the fusion width; mask: (B, N) True where a token is real.
    """

    feats: torch.Tensor
    mask: torch.Tensor


class Memory(NamedTuple):
    """The fused memory the decoder is conditioned on: feats (B, M, D), mask (B, M)."""

    feats: torch.Tensor
    mask: torch.Tensor
