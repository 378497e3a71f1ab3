"""Image loading and normalisation for the vision encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmfuse.processing.errors import MediaError


class ImageProcessor:
    """Loads an image file into normalised pixels (3, size, size).

    Args:
        size: side in pixels the encoder expects; other sizes are resized (bicubic).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
    """

    def __init__(
        self,
        size: int = 64,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def load(self, source: str | Path | BinaryIO) -> torch.Tensor:
        """Reads a file path or an open binary file and returns (3, size, size) pixels."""
        if isinstance(source, (str, Path)):
            source = Path(source)
            if not source.is_file():
                raise MediaError(f"image file not found: {source}")
        name = source if isinstance(source, Path) else "<image data>"
        try:
            with Image.open(source) as img:
                img = img.convert("RGB")
                if img.size != (self.size, self.size):
                    img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
                array = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise MediaError(f"unreadable image {name}: {err}") from err
        return self.from_array(array)

    def from_array(self, array: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, H, W) normalised float pixels."""
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return (pixels - self.mean) / self.std
