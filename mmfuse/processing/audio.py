"""Audio loading for the waveform encoder: mono, resampled, length-limited, normalised.

Files are read with soundfile (any format libsndfile reads: WAV, FLAC, OGG, ...); several
channels are averaged to mono; any sampling rate is resampled to the encoder's with
``torchaudio.functional.resample``. A WAV file whose ``data`` chunk is shorter than its
header says is an error (libsndfile would silently return the part that is there).

Clips longer than ``max_seconds`` (``long_audio``):

- ``crop``: keep the first ``max_seconds`` (a random window in training when
  ``augment.random_crop``);
- ``chunk``: keep up to ``max_chunks`` windows of ``max_seconds``; the audio encoder sees each
  window separately and the fusion all their frames (``mmfuse.encoding``);
- ``skip``: the record is bad (reason ``audio too long``), handled by ``data.on_bad_record``.

Normalisation (``normalize``): ``zscore`` (or true; zero mean and unit variance per clip, as
wav2vec2's feature extractor does), ``peak`` (largest magnitude ``peak_level``), ``rms``
(root mean square ``rms_level``) or ``none`` (false).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from mmfuse.processing.errors import (
    AUDIO_TOO_LONG,
    EMPTY_AUDIO,
    TRUNCATED_AUDIO,
    UNREADABLE_AUDIO,
    MediaError,
    check_media_file,
)

_NORMALIZE = {
    True: "zscore",
    False: "none",
    "zscore": "zscore",
    "none": "none",
    "peak": "peak",
    "rms": "rms",
}
_LONG_AUDIO = ("crop", "chunk", "skip")
_AUGMENT_KEYS = {"random_crop"}


class AudioProcessor:
    """Loads an audio file into a mono waveform (S,) at ``sample_rate``.

    Args:
        sample_rate: the encoder's rate; other rates are resampled.
        max_seconds: longest clip (or window, with ``long_audio=chunk``).
        normalize: ``zscore``/true, ``peak``, ``rms`` or ``none``/false.
        long_audio: ``crop``, ``chunk`` or ``skip`` (see the module docstring).
        max_chunks: windows kept with ``long_audio=chunk``.
        peak_level: largest magnitude after ``peak`` normalisation.
        rms_level: root mean square after ``rms`` normalisation.
        augment: training augmentation, applied only when ``load`` gets an ``augment_seed``:
            ``random_crop`` (a random window of a long clip instead of its start).
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        max_seconds: float = 30.0,
        normalize: bool | str = True,
        long_audio: str = "crop",
        max_chunks: int = 4,
        peak_level: float = 1.0,
        rms_level: float = 0.1,
        augment: Mapping[str, Any] | None = None,
    ) -> None:
        if normalize not in _NORMALIZE:
            raise ValueError(
                "processor.audio.normalize must be true, false, zscore, peak, rms or none, "
                f"got {normalize!r}"
            )
        if long_audio not in _LONG_AUDIO:
            raise ValueError(
                f"processor.audio.long_audio must be one of {_LONG_AUDIO}, got {long_audio!r}"
            )
        augment = dict(augment or {})
        unknown = set(augment) - _AUGMENT_KEYS
        if unknown:
            raise ValueError(f"processor.audio.augment: unknown keys {sorted(unknown)}")
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.max_samples = int(max_seconds * sample_rate)
        self.normalize = normalize
        self.mode = _NORMALIZE[normalize]
        self.long_audio = long_audio
        self.max_chunks = int(max_chunks)
        self.peak_level, self.rms_level = float(peak_level), float(rms_level)
        self.augment = augment

    @property
    def augments(self) -> bool:
        """Whether training augmentation changes the waveform (a random crop)."""
        return bool(self.augment.get("random_crop")) and self.long_audio == "crop"

    @property
    def chunk_samples(self) -> int:
        """Samples per encoder window with ``long_audio=chunk``, else 0."""
        return self.max_samples if self.long_audio == "chunk" else 0

    def settings(self) -> dict[str, Any]:
        """Everything that decides the evaluation waveform (a feature-cache key)."""
        return {
            "sample_rate": self.sample_rate,
            "max_seconds": self.max_seconds,
            "normalize": self.mode,
            "long_audio": self.long_audio,
            "max_chunks": self.max_chunks if self.long_audio == "chunk" else None,
            "peak_level": self.peak_level if self.mode == "peak" else None,
            "rms_level": self.rms_level if self.mode == "rms" else None,
        }

    def load(self, source: str | Path | BinaryIO, augment_seed: int | None = None) -> torch.Tensor:
        """Reads a file path or an open binary file; returns the processed (S,) waveform.

        Args:
            source: the audio file.
            augment_seed: apply the training augmentation with this seed; None: none.

        Raises:
            MediaError: naming the file and the reason (``processing.errors``).
        """
        name = check_media_file(source, "audio")
        _check_wav_length(source, name)
        if isinstance(source, Path):
            source = str(source)
        try:
            if self.long_audio == "skip":
                info = sf.info(source)
                if info.duration > self.max_seconds:
                    raise MediaError(
                        f"audio too long: {name} lasts {info.duration:.2f} s, more than "
                        f"processor.audio.max_seconds={self.max_seconds}",
                        AUDIO_TOO_LONG,
                    )
                _rewind(source)
            data, rate = sf.read(source, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
            if isinstance(err, MediaError):
                raise
            raise MediaError(f"unreadable audio {name}: {err}", UNREADABLE_AUDIO) from err
        if data.shape[0] == 0:
            raise MediaError(f"empty audio {name}: no samples", EMPTY_AUDIO)
        if not np.isfinite(data).all():
            raise MediaError(f"unreadable audio {name}: NaN or infinite samples", UNREADABLE_AUDIO)
        return self.from_array(data.mean(axis=1), rate, augment_seed)

    def from_array(
        self, wave: np.ndarray, rate: int, augment_seed: int | None = None
    ) -> torch.Tensor:
        """(S,) float waveform at ``rate`` -> processed (S',) waveform."""
        signal = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        if rate != self.sample_rate:
            signal = AF.resample(signal, rate, self.sample_rate)
        signal = self._limit(signal, augment_seed)
        return self._normalized(signal)

    def _limit(self, signal: torch.Tensor, augment_seed: int | None) -> torch.Tensor:
        keep = self.max_samples * (self.max_chunks if self.long_audio == "chunk" else 1)
        if signal.shape[0] <= keep:
            return signal
        start = 0
        if augment_seed is not None and self.augments:
            generator = torch.Generator().manual_seed(augment_seed)
            start = int(torch.randint(signal.shape[0] - keep + 1, (1,), generator=generator))
        return signal[start : start + keep]

    def _normalized(self, signal: torch.Tensor) -> torch.Tensor:
        if self.mode == "zscore":
            return (signal - signal.mean()) / torch.sqrt(signal.var(unbiased=False) + 1e-7)
        if self.mode == "peak":
            return signal * (self.peak_level / signal.abs().max().clamp(min=1e-7))
        if self.mode == "rms":
            rms = signal.pow(2).mean().sqrt().clamp(min=1e-7)
            return signal * (self.rms_level / rms)
        return signal


def _rewind(source: Any) -> None:
    if hasattr(source, "seek"):
        source.seek(0)


def _check_wav_length(source: str | Path | BinaryIO, name: str) -> None:
    """A RIFF/WAVE file whose ``data`` chunk claims more bytes than the file holds is cut."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as handle:
            header = handle.read(4096)
            total = Path(source).stat().st_size
    else:
        position = source.tell()
        header = source.read(4096)
        source.seek(0, 2)
        total = source.tell() - position
        source.seek(position)
    if len(header) < 12 or header[:4] not in (b"RIFF", b"RIFX") or header[8:12] != b"WAVE":
        return
    endian = "<" if header[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 8 <= len(header):
        chunk, size = (
            header[offset : offset + 4],
            struct.unpack(endian + "I", header[offset + 4 : offset + 8])[0],
        )
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF):  # written while streaming: length unknown
                return
            available = total - offset - 8
            if available < size:
                raise MediaError(
                    f"truncated audio {name}: the WAV data chunk holds {available} of its "
                    f"{size} bytes",
                    TRUNCATED_AUDIO,
                )
            return
        offset += 8 + size + (size & 1)
