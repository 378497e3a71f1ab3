"""Errors raised for bad input; each message names the file, the record and the reason."""


class MediaError(ValueError):
    """A media file that cannot be used; the message names the file and why."""


class RecordError(ValueError):
    """A conversation record that cannot be used."""

    def __init__(self, source: str, record_id: str, reason: str) -> None:
        super().__init__(f"{source}: record {record_id!r}: {reason}")
        self.source = source
        self.record_id = record_id
        self.reason = reason
