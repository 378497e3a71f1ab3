"""Image loading, conversion to RGB, resizing, training augmentation and normalisation.

``load`` checks the file (present, not empty, pixel count from the header against
``max_pixels`` before anything is decoded: a decompression bomb never reaches memory), decodes
it fully (a truncated PNG or JPEG is an error, not a half-grey picture), turns every mode into
RGB and then applies the torchvision ``transforms.v2`` pipeline:

- evaluation: ``resize`` (``stretch`` to ``size`` x ``size``, or ``shortest_edge``: the
  shorter side to ``size`` keeping the aspect ratio, then a centre crop);
- training (only when the caller passes an ``augment_seed``): ``augment.random_resized_crop``
  replaces the resize when set, then ``augment.horizontal_flip`` and ``augment.color_jitter``.

Pixels are scaled to [0, 1] and normalised with the encoder preset's ``mean`` and ``std``.

Modes: grayscale (``L``, ``1``, 16-bit ``I;16``/``I``, float ``F``) is repeated to three
channels; CMYK, YCbCr and palette images are converted; an image with transparency (``RGBA``,
``LA``, ``PA``, a palette or single colour marked transparent) is composited on
``alpha_background`` (white by default, as browsers and most viewers show it; ``black`` as
some data sets were made). EXIF orientation (phone photos) is applied when
``exif_transpose``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from mmfuse.processing.errors import (
    IMAGE_TOO_LARGE,
    TRUNCATED_IMAGE,
    UNREADABLE_IMAGE,
    MediaError,
    check_media_file,
)

_RESIZE = ("stretch", "shortest_edge")
_BACKGROUNDS = {"white": (255, 255, 255, 255), "black": (0, 0, 0, 255)}
_AUGMENT_KEYS = {"random_resized_crop", "horizontal_flip", "color_jitter"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_ORIENTATION = 0x0112  # the EXIF orientation tag


class ImageProcessor:
    """Loads an image file into normalised pixels (3, size, size).

    Args:
        size: side in pixels the encoder expects.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        resize: ``stretch`` (to size x size, the aspect ratio is not kept) or
            ``shortest_edge`` (shorter side to ``size``, then a centre crop; CLIP's way).
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.
        alpha_background: ``white`` or ``black``: what transparent pixels are composited on.
        max_pixels: width x height limit, read from the header before decoding.
        exif_transpose: apply the EXIF orientation tag.
        augment: training augmentation, applied only when ``load`` gets an ``augment_seed``:
            ``random_resized_crop`` (null, or ``{scale: [lo, hi], ratio: [lo, hi]}``),
            ``horizontal_flip`` (probability; 0 by default: flipping changes left and right
            in questions about positions), ``color_jitter`` (null, or torchvision
            ``ColorJitter`` arguments).
    """

    def __init__(
        self,
        size: int = 64,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        resize: str = "stretch",
        interpolation: str = "bicubic",
        alpha_background: str = "white",
        max_pixels: int = 64_000_000,
        exif_transpose: bool = True,
        augment: Mapping[str, Any] | None = None,
    ) -> None:
        if resize not in _RESIZE:
            raise ValueError(f"processor.image.resize must be one of {_RESIZE}, got {resize!r}")
        if alpha_background not in _BACKGROUNDS:
            raise ValueError(
                f"processor.image.alpha_background must be one of {sorted(_BACKGROUNDS)}, "
                f"got {alpha_background!r}"
            )
        mode = getattr(v2.InterpolationMode, str(interpolation).upper(), None)
        if mode is None:
            raise ValueError(f"processor.image.interpolation: unknown {interpolation!r}")
        augment = dict(augment or {})
        unknown = set(augment) - _AUGMENT_KEYS
        if unknown:
            raise ValueError(
                f"processor.image.augment: unknown keys {sorted(unknown)}; "
                f"known: {sorted(_AUGMENT_KEYS)}"
            )
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.resize = resize
        self.interpolation = str(interpolation)
        self.alpha_background = alpha_background
        self.max_pixels = int(max_pixels)
        self.exif_transpose = exif_transpose
        self.augment = augment
        self._eval = self._geometry(mode, None)
        self._train = self._geometry(mode, augment) if self.augments else self._eval

    @property
    def augments(self) -> bool:
        """Whether training augmentation changes the pixels (so they differ every epoch)."""
        a = self.augment
        return bool(
            a.get("random_resized_crop") or a.get("horizontal_flip") or a.get("color_jitter")
        )

    def settings(self) -> dict[str, Any]:
        """Everything that decides the evaluation pixels (a feature-cache key)."""
        return {
            "size": self.size,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "alpha_background": self.alpha_background,
            "exif_transpose": self.exif_transpose,
        }

    def _geometry(self, mode: v2.InterpolationMode, augment: Mapping | None) -> v2.Compose:
        """The PIL -> PIL transforms: resize (or random resized crop), flip, colour."""
        size = (self.size, self.size)
        steps: list[Any] = []
        crop = (augment or {}).get("random_resized_crop")
        if crop:
            crop = dict(crop) if isinstance(crop, Mapping) else {}
            steps.append(v2.RandomResizedCrop(size, interpolation=mode, **crop))
        elif self.resize == "shortest_edge":
            steps += [v2.Resize(self.size, interpolation=mode), v2.CenterCrop(size)]
        else:
            steps.append(_Stretch(size, mode))
        if (augment or {}).get("horizontal_flip"):
            steps.append(v2.RandomHorizontalFlip(float(augment["horizontal_flip"])))
        if (augment or {}).get("color_jitter"):
            steps.append(v2.ColorJitter(**dict(augment["color_jitter"])))
        return v2.Compose(steps)

    def load(self, source: str | Path | BinaryIO, augment_seed: int | None = None) -> torch.Tensor:
        """Reads a file path or an open binary file and returns (3, size, size) pixels.

        Args:
            source: the image file.
            augment_seed: apply the training augmentation, drawing from this seed (the same
                seed gives the same crop and flip, whatever process runs it); None: none.

        Raises:
            MediaError: naming the file and the reason (``processing.errors``).
        """
        name = check_media_file(source, "image")
        try:
            with Image.open(source) as img:
                width, height = img.size
                if width * height > self.max_pixels:
                    raise MediaError(
                        f"image too large: {name} is {width}x{height} = {width * height:,} "
                        f"pixels, more than processor.image.max_pixels={self.max_pixels:,} "
                        "(checked from the header; a decompression bomb?)",
                        IMAGE_TOO_LARGE,
                    )
                img.load()  # decode everything now: a truncated file fails here
                rgb = self._to_rgb(img)
        except Image.DecompressionBombError as err:
            raise MediaError(f"image too large: {name}: {err}", IMAGE_TOO_LARGE) from err
        except UnidentifiedImageError as err:
            raise MediaError(f"unreadable image {name}: {err}", UNREADABLE_IMAGE) from err
        except (OSError, SyntaxError, ValueError) as err:
            if isinstance(err, MediaError):
                raise
            if "truncated" in str(err):
                raise MediaError(f"truncated image {name}: {err}", TRUNCATED_IMAGE) from err
            raise MediaError(f"unreadable image {name}: {err}", UNREADABLE_IMAGE) from err
        if augment_seed is None or not self.augments:
            rgb = self._eval(rgb)
        else:
            with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
                torch.manual_seed(augment_seed)
                rgb = self._train(rgb)
        return self.from_array(np.asarray(rgb, dtype=np.uint8))

    def _to_rgb(self, img: Image.Image) -> Image.Image:
        """Any PIL mode -> RGB (see the module docstring)."""
        if self.exif_transpose and img.getexif().get(_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        if img.mode == "RGB" and "transparency" not in img.info:
            return img
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, _BACKGROUNDS[self.alpha_background])
            return Image.alpha_composite(background, rgba).convert("RGB")
        if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float grey
            grey = np.asarray(img, dtype=np.float64)
            if img.mode.startswith("I;16") or (img.mode == "I" and grey.max(initial=0) > 255):
                grey = grey / 257.0
            elif img.mode == "F" and grey.max(initial=0) <= 1.0:
                grey = grey * 255.0
            grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
            return Image.fromarray(np.stack([grey] * 3, axis=-1))
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...

    def from_array(self, array: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, H, W) normalised float pixels."""
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return (pixels - self.mean) / self.std


class _Stretch(v2.Transform):
    """Resizes to exactly ``size`` (PIL's resampling on PIL images); a no-op at that size."""

    def __init__(self, size: tuple[int, int], interpolation: v2.InterpolationMode) -> None:
        super().__init__()
        self.resize = v2.Resize(size, interpolation=interpolation)
        self.size = size

    def forward(self, img: Any) -> Any:
        if isinstance(img, Image.Image) and img.size == self.size[::-1]:
            return img
        return self.resize(img)
