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

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """Moves every tensor field to ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
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
