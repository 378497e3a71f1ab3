"""A conversation corpus with every kind of bad input, written into a test's directory.

``write_bad_corpus(base)`` writes ``corpus.jsonl`` next to its media: good records of every
modality, one long multi-turn conversation that must be truncated (a good record), and one
record per bad case, whose id names the case. ``BAD_CASES`` maps each bad record's id to the
reason it must be skipped or rejected with.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
from helpers import SAMPLE_RATE, mixed_records, record, write_media, write_wav
from PIL import Image

# bad record id -> (reason, file named in the error or None)
BAD_CASES: dict[str, tuple[str, str | None]] = {
    "bad-missing-file": ("missing file", "nope.png"),
    "bad-empty-png": ("empty file", "empty.png"),
    "bad-empty-wav": ("empty file", "empty.wav"),
    "bad-truncated-png": ("truncated image", "cut.png"),
    "bad-truncated-jpeg": ("truncated image", "cut.jpg"),
    "bad-not-an-image": ("unreadable image", "text.png"),
    "bad-bomb": ("image too large", "bomb.png"),
    "bad-unreadable-wav": ("unreadable audio", "garbage.wav"),
    "bad-truncated-wav": ("truncated audio", "cut.wav"),
    "bad-empty-audio": ("empty audio", "silent.wav"),
    "bad-typed-placeholder": ("media mismatch", None),
    "bad-media-in-answer": ("media mismatch", None),
    "bad-empty-answer": ("empty text", None),
    "bad-no-assistant": ("no assistant turn", None),
    "bad-too-long": ("too long", None),
}
N_GOOD = 26  # including the long conversation, which is truncated, not skipped
LONG_ID = "good-long-conversation"


def expected_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason, _ in BAD_CASES.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> None:
    """A valid small PNG whose header claims ``width`` x ``height`` pixels."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def write_bad_media(base: Path) -> None:
    write_media(base)
    (base / "empty.png").write_bytes(b"")
    (base / "empty.wav").write_bytes(b"")
    png = (base / "a.png").read_bytes()
    (base / "cut.png").write_bytes(png[: len(png) // 2])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(base / "n.jpg")
    jpeg = (base / "n.jpg").read_bytes()
    (base / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (base / "text.png").write_bytes(b"this is not a picture\n" * 20)
    _bomb_png(base / "bomb.png")
    (base / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + b"\x00" * 40)
    wav = write_wav(base / "whole.wav", seconds=1.0).read_bytes()
    (base / "cut.wav").write_bytes(wav[: len(wav) // 2])
    sf.write(str(base / "silent.wav"), np.zeros(0, dtype=np.float32), SAMPLE_RATE)


def _bad_records() -> list[dict]:
    records = {
        "bad-missing-file": record("", "What color?", "red", image="nope.png"),
        "bad-empty-png": record("", "What color?", "red", image="empty.png"),
        "bad-empty-wav": record("", "How many beeps?", "one", audio="empty.wav"),
        "bad-truncated-png": record("", "What color?", "red", image="cut.png"),
        "bad-truncated-jpeg": record("", "What color?", "red", image="cut.jpg"),
        "bad-not-an-image": record("", "What color?", "red", image="text.png"),
        "bad-bomb": record("", "What color?", "red", image="bomb.png"),
        "bad-unreadable-wav": record("", "How many beeps?", "one", audio="garbage.wav"),
        "bad-truncated-wav": record("", "How many beeps?", "one", audio="cut.wav"),
        "bad-empty-audio": record("", "How many beeps?", "one", audio="silent.wav"),
        "bad-typed-placeholder": record("", "<|image|> What color?", "red", image="a.png"),
        "bad-media-in-answer": record("", "Draw a circle.", "here", task="image/draw"),
        "bad-empty-answer": record("", "What color?", "", image="a.png"),
        "bad-no-assistant": record("", "What color?", "red", image="a.png"),
        "bad-too-long": record("", "Tell me everything.", " ".join(["word"] * 400)),
    }
    records["bad-media-in-answer"]["messages"][1]["content"].append(
        {"type": "image", "path": "a.png"}
    )
    records["bad-no-assistant"]["messages"] = records["bad-no-assistant"]["messages"][:1]
    out = []
    for record_id, rec in records.items():
        rec["id"] = record_id
        out.append(rec)
    return out


def long_conversation() -> dict:
    """Eight exchanges, longer together than max_length=256; the last one is short."""
    rec = record(LONG_ID, "Describe the picture in detail please.", "a red circle", image="a.png")
    for turn in range(7):
        rec["messages"] += [
            {"role": "user", "content": f"Question {turn}: " + "tell me more " * 8},
            {"role": "assistant", "content": "more words about it " * 4},
        ]
    rec["messages"] += [
        {"role": "user", "content": "And its color?"},
        {"role": "assistant", "content": "red"},
    ]
    return rec


def corpus_records() -> list[dict]:
    good = []
    base = mixed_records()
    for i in range(N_GOOD - 1):
        rec = json.loads(json.dumps(base[i % len(base)]))
        rec["id"] = f"good-{i:02d}"
        good.append(rec)
    good.append(long_conversation())
    bad = _bad_records()
    records, b = [], 0
    for i, rec in enumerate(good):  # bad records spread through the file
        records.append(rec)
        if i % 2 == 1 and b < len(bad):
            records.append(bad[b])
            b += 1
    return records + bad[b:]


def write_bad_corpus(base: Path) -> Path:
    """Writes the media and ``corpus.jsonl`` into ``base``; returns the JSONL path."""
    base.mkdir(parents=True, exist_ok=True)
    write_bad_media(base)
    path = base / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus_records()))
    return path
