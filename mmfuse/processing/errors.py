"""Errors raised for bad input; each message names the file, the record and the reason.

Every error carries a ``reason``: one of the short keys below, by which ``data.on_bad_record=
skip`` counts the records it skips (``data_modules.bad_records``).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

# Reasons a record cannot be used (the keys skipped records are counted by).
MISSING_FILE = "missing file"
EMPTY_FILE = "empty file"
UNREADABLE_IMAGE = "unreadable image"
TRUNCATED_IMAGE = "truncated image"
IMAGE_TOO_LARGE = "image too large"
UNREADABLE_AUDIO = "unreadable audio"
TRUNCATED_AUDIO = "truncated audio"
EMPTY_AUDIO = "empty audio"
AUDIO_TOO_LONG = "audio too long"
MEDIA_MISMATCH = "media mismatch"
EMPTY_TEXT = "empty text"
NO_ASSISTANT_TURN = "no assistant turn"
TOO_LONG = "too long"
NO_SUPERVISED_TOKEN = "no supervised token"
INVALID_RECORD = "invalid record"

REASONS: tuple[str, ...] = (
    MISSING_FILE,
    EMPTY_FILE,
    UNREADABLE_IMAGE,
    TRUNCATED_IMAGE,
    IMAGE_TOO_LARGE,
    UNREADABLE_AUDIO,
    TRUNCATED_AUDIO,
    EMPTY_AUDIO,
    AUDIO_TOO_LONG,
    MEDIA_MISMATCH,
    EMPTY_TEXT,
    NO_ASSISTANT_TURN,
    TOO_LONG,
    NO_SUPERVISED_TOKEN,
    INVALID_RECORD,
)


class InputError(ValueError):
    """A problem with one record or one of its media files.

    Args:
        message: what is wrong, naming the file where there is one.
        reason: one of :data:`REASONS`.
    """

    def __init__(self, message: str, reason: str = INVALID_RECORD) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (str(self), self.reason))


class MediaError(InputError):
    """A media file that cannot be used; the message names the file and why."""

    def __init__(self, message: str, reason: str = UNREADABLE_IMAGE) -> None:
        super().__init__(message, reason)


class RecordError(ValueError):
    """A conversation record that cannot be used: ``"<source>: record '<id>': <reason>:
    <detail>"``.

    Attributes:
        source: the file the record came from.
        record_id: the record's id.
        reason: one of :data:`REASONS`.
        detail: what is wrong, naming the media file where there is one.

    A single string argument is accepted too (the message as a whole), so that the error can
    be re-raised from a DataLoader worker process with its type and message.
    """

    def __init__(
        self,
        source: str,
        record_id: str | None = None,
        detail: str | None = None,
        reason: str = INVALID_RECORD,
    ) -> None:
        self._init_args = (source, record_id, detail, reason)
        if record_id is None and detail is None:  # the message alone (a re-raise)
            super().__init__(source)
            self.source, self.record_id, self.detail, self.reason = "", None, source, reason
            return
        detail = detail or ""
        text = detail if detail.startswith(reason) else f"{reason}: {detail}"
        super().__init__(f"{source}: record {record_id!r}: {text}")
        self.source, self.record_id, self.detail, self.reason = source, record_id, detail, reason

    def __reduce__(self):
        return (type(self), self._init_args)


def check_media_file(source: str | Path | BinaryIO, kind: str) -> str:
    """The file's name for messages; a missing or empty file is a ``MediaError``."""
    if not isinstance(source, (str, Path)):
        return f"<{kind} data>"
    path = Path(source)
    if not path.is_file():
        raise MediaError(f"{kind} file not found: {path}", MISSING_FILE)
    if path.stat().st_size == 0:
        raise MediaError(f"{kind} file is empty (0 bytes): {path}", EMPTY_FILE)
    return str(path)
