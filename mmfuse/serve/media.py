"""Media in server requests: strict decoding and every limit checked before the data is used.

An image arrives as an ``image_url`` (a base64 ``data:`` URL by default; http(s) URLs and
local paths only when enabled) and audio as ``input_audio`` (base64 with a ``format``). Each
is checked against the limits (MIME allowlist, bytes, image pixels read from the header before
any decoding, audio duration from the header) and returned as raw bytes for the processor.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import soundfile as sf
from PIL import Image, UnidentifiedImageError

from mmfuse.serve.errors import APIError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)
_PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG"}
_AUDIO_FORMATS = {"wav": "WAV"}


@dataclass
class MediaLimits:
    """What a request may carry (all from the server config).

    Attributes:
        image_mime_types: accepted image types in ``data:`` URLs.
        audio_formats: accepted ``input_audio`` formats.
        max_image_pixels: width x height, checked from the header before decoding.
        max_audio_seconds: longest audio clip.
        max_media_bytes: largest decoded media part.
        allow_remote: fetch http(s) image URLs (then only from ``remote_domains``, without
            following redirects).
        remote_domains: host names remote URLs may point at.
        remote_timeout_s: time limit of one fetch.
        local_dir: directory local image paths are confined to; None refuses local paths.
    """

    image_mime_types: list[str] = field(default_factory=lambda: ["image/png", "image/jpeg"])
    audio_formats: list[str] = field(default_factory=lambda: ["wav"])
    max_image_pixels: int = 16_000_000
    max_audio_seconds: float = 60.0
    max_media_bytes: int = 16_000_000
    allow_remote: bool = False
    remote_domains: list[str] = field(default_factory=list)
    remote_timeout_s: float = 10.0
    local_dir: str | None = None


def strict_b64decode(data: str, param: str, limits: MediaLimits) -> bytes:
    """Decodes standard base64, refusing any character outside the alphabet."""
    if len(data) > limits.max_media_bytes * 4 // 3 + 4:
        raise APIError(413, f"{param}: media larger than {limits.max_media_bytes} bytes", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"{param}: invalid base64 data ({err})", param) from err
    if not raw:
        raise APIError(400, f"{param}: empty media data", param)
    return raw


def image_from_url(url: str, param: str, limits: MediaLimits) -> bytes:
    """Returns checked image bytes for an ``image_url.url``."""
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None:
            raise APIError(400, f"{param}: a data URL must be data:<mime>;base64,<data>", param)
        mime = match["mime"].lower()
        if mime not in limits.image_mime_types or mime not in _PIL_FORMATS:
            allowed = ", ".join(limits.image_mime_types)
            raise APIError(
                400, f"{param}: image type {mime} not allowed (allowed: {allowed})", param
            )
        raw = strict_b64decode(match["data"], param, limits)
        check_image(raw, param, limits, expected=_PIL_FORMATS[mime])
        return raw
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        raw = _fetch_remote(url, param, limits)
    else:
        raw = _read_local(url, param, limits)
    check_image(raw, param, limits)
    return raw


def check_image(raw: bytes, param: str, limits: MediaLimits, expected: str | None = None) -> None:
    """Reads the image header only: format and pixel count, before anything is decoded."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            kind = img.format
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise APIError(400, f"{param}: not a readable image ({err})", param) from err
    allowed = {_PIL_FORMATS[m] for m in limits.image_mime_types if m in _PIL_FORMATS}
    if kind not in allowed or (expected is not None and kind != expected):
        raise APIError(400, f"{param}: image data is {kind}, expected {expected or allowed}", param)
    if width * height > limits.max_image_pixels:
        raise APIError(
            400,
            f"{param}: image of {width}x{height} pixels is over the limit of "
            f"{limits.max_image_pixels} pixels",
            param,
        )


def audio_from_input(data: str, fmt: str, param: str, limits: MediaLimits) -> bytes:
    """Returns checked audio bytes for an ``input_audio`` part."""
    fmt = (fmt or "").lower()
    if fmt not in limits.audio_formats or fmt not in _AUDIO_FORMATS:
        allowed = ", ".join(limits.audio_formats)
        raise APIError(
            400, f"{param}: audio format {fmt!r} not allowed (allowed: {allowed})", param
        )
    raw = strict_b64decode(data, param, limits)
    try:
        info = sf.info(io.BytesIO(raw))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise APIError(400, f"{param}: not readable {fmt} audio ({err})", param) from err
    if info.format != _AUDIO_FORMATS[fmt]:
        raise APIError(400, f"{param}: audio data is {info.format}, expected {fmt}", param)
    if info.frames == 0 or info.samplerate <= 0:
        raise APIError(400, f"{param}: empty audio", param)
    seconds = info.frames / info.samplerate
    if seconds > limits.max_audio_seconds:
        raise APIError(
            400,
            f"{param}: audio of {seconds:.1f} s is over the limit of {limits.max_audio_seconds} s",
            param,
        )
    return raw


def _fetch_remote(url: str, param: str, limits: MediaLimits) -> bytes:
    if not limits.allow_remote:
        raise APIError(400, f"{param}: remote media URLs are disabled; send a data: URL", param)
    host = (urlsplit(url).hostname or "").lower()
    if host not in {d.lower() for d in limits.remote_domains}:
        raise APIError(400, f"{param}: host {host!r} is not in the allowed domains", param)
    import httpx

    try:
        with httpx.stream(
            "GET", url, follow_redirects=False, timeout=limits.remote_timeout_s
        ) as response:
            if response.is_redirect:
                raise APIError(400, f"{param}: {url} redirects; redirects are not followed", param)
            if response.status_code != 200:
                raise APIError(400, f"{param}: {url} answered {response.status_code}", param)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limits.max_media_bytes:
                    raise APIError(
                        413, f"{param}: media over {limits.max_media_bytes} bytes", param
                    )
                chunks.append(chunk)
    except httpx.HTTPError as err:
        raise APIError(
            400, f"{param}: could not fetch {url} ({type(err).__name__})", param
        ) from err
    return b"".join(chunks)


def _read_local(url: str, param: str, limits: MediaLimits) -> bytes:
    if limits.local_dir is None:
        raise APIError(400, f"{param}: local paths are disabled; send a data: URL", param)
    parts = urlsplit(url)
    if parts.scheme not in ("", "file") or (parts.scheme == "file" and parts.netloc):
        raise APIError(400, f"{param}: unsupported URL scheme {parts.scheme!r}", param)
    relative = unquote(parts.path)  # percent-encoded '../' is still '../'
    root = Path(limits.local_dir).resolve()
    path = (root / relative.lstrip("/")).resolve()
    if not path.is_relative_to(root):
        raise APIError(400, f"{param}: path {relative!r} leaves the media directory", param)
    if not path.is_file():
        raise APIError(400, f"{param}: no file {relative!r} in the media directory", param)
    if path.stat().st_size > limits.max_media_bytes:
        raise APIError(413, f"{param}: media over {limits.max_media_bytes} bytes", param)
    return path.read_bytes()
