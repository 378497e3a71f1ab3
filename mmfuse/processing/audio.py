"""Audio loading for the waveform encoder: mono, resampled, cropped, normalised."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from mmfuse.processing.errors import MediaError


class AudioProcessor:
    """Loads an audio file into a mono waveform (S,) at ``sample_rate``.

    Args:
        sample_rate: the encoder's rate; other rates are resampled.
        max_seconds: longer clips are cropped to this length.
        normalize: zero mean, unit variance per clip (as wav2vec2's feature extractor does).
    """

    def __init__(self, sample_rate: int = 16000, max_seconds: float = 30.0, normalize: bool = True):
        self.sample_rate = sample_rate
        self.max_samples = int(max_seconds * sample_rate)
        self.normalize = normalize

    def load(self, source: str | Path | BinaryIO) -> torch.Tensor:
        """Reads a file path or an open binary file; returns the processed (S,) waveform."""
        if isinstance(source, (str, Path)):
            source = Path(source)
            if not source.is_file():
                raise MediaError(f"audio file not found: {source}")
        name = source if isinstance(source, Path) else "<audio data>"
        try:
            data, rate = sf.read(
                str(source) if isinstance(source, Path) else source, dtype="float32", always_2d=True
            )
        except (sf.LibsndfileError, RuntimeError, TypeError) as err:
            raise MediaError(f"unreadable audio {name}: {err}") from err
        if data.shape[0] == 0:
            raise MediaError(f"empty audio {name}")
        return self.from_array(data.mean(axis=1), rate)

    def from_array(self, wave: np.ndarray, rate: int) -> torch.Tensor:
        """(S,) float waveform at ``rate`` -> processed (S',) waveform."""
        signal = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        if rate != self.sample_rate:
            signal = AF.resample(signal, rate, self.sample_rate)
        signal = signal[: self.max_samples]
        if self.normalize:
            signal = (signal - signal.mean()) / torch.sqrt(signal.var(unbiased=False) + 1e-7)
        return signal
