"""Cheap per-record sizes for length-grouped batching: token counts and audio durations.

Nothing is decoded: tokens are counted on the messages' text in one batched tokenizer call,
plus the chat template's fixed cost per message (measured once by rendering), and audio
durations come from the file headers (``soundfile.info``). A file that cannot be read counts
as no audio (the record is dealt with when it is processed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import soundfile as sf

from mmfuse.processing.processor import Processor
from mmfuse.processing.text import encode_conversation

_PER_MESSAGE_FALLBACK = 4


def record_lengths(
    records: Sequence[dict],
    processor: Processor,
    base_dir: str | Path,
    audio_bucket_seconds: float | None = 1.0,
) -> list[tuple[int, int]]:
    """One sort key per record: (audio duration bucket, estimated tokens).

    Records are grouped first by ``ceil(audio seconds / audio_bucket_seconds)`` (0 without
    audio; with ``audio_bucket_seconds`` null or 0 audio is ignored), then by tokens, so a
    batch pads neither its waveforms nor its token rows much.
    """
    texts, counts = [], []
    for record in records:
        messages = record.get("messages") if isinstance(record.get("messages"), list) else []
        counts.append(len(messages))
        texts.append("\n".join(_text(m) for m in messages))
    tokenizer = processor.tokenizer
    tokens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    overhead = _per_message_tokens(processor)
    keys = []
    base = Path(base_dir)
    for record, n_tokens, n_messages in zip(records, tokens, counts, strict=True):
        bucket = 0
        if audio_bucket_seconds:
            seconds = audio_seconds(record, base)
            bucket = math.ceil(seconds / audio_bucket_seconds) if seconds else 0
        keys.append((bucket, n_tokens + overhead * n_messages))
    return keys


def audio_seconds(record: dict, base_dir: Path) -> float:
    """Duration of the record's audio parts from their headers (0 when none or unreadable)."""
    total = 0.0
    for message in record.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "audio" and "path" in part:
                try:
                    total += sf.info(str(base_dir / str(part["path"]))).duration
                except (RuntimeError, OSError, TypeError, ValueError):
                    pass
    return total


def _text(message: dict) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    pieces = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict):
            text = part.get("text")
            pieces.append(text if isinstance(text, str) else "")
    return "".join(pieces)


def _per_message_tokens(processor: Processor) -> int:
    """Tokens the chat template adds around one message (role header, end of turn)."""
    try:
        one, _ = encode_conversation(
            processor.tokenizer,
            [
                {"role": "user", "content": [{"type": "text", "text": ""}]},
                {"role": "assistant", "content": [{"type": "text", "text": ""}]},
            ],
        )
    except Exception:  # an unusual template: a fixed guess is good enough for sorting
        return _PER_MESSAGE_FALLBACK
    return max(1, len(one) // 2)
