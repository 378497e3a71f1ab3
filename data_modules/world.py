"""The built-in "shapes-and-sounds world" benchmark, generated deterministically from a seed.

Each record is a short conversation about a 64x64 picture of coloured shapes, a one-second
clip of beeps, or both. Records are written as JSONL (``train.jsonl``, ``val.jsonl``,
``test.jsonl``) next to ``images/`` (PNG) and ``audio/`` (WAV) folders; ``meta/{split}.jsonl``
holds the hidden generation parameters of every record (for tests and debugging) and
``world.json`` is the manifest, written last.

Every random choice is made in the main process from ``numpy.random.default_rng`` streams
derived from the seed; worker processes only render, so the output is byte-identical for any
number of workers.

Example:
    python -m data_modules.world --out data/world --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

WORLD_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")

TASKS: tuple[str, ...] = (
    "image/color",
    "image/shape",
    "image/count",
    "image/where",
    "image/caption",
    "audio/count",
    "audio/pitch",
    "audio/wave",
    "audio/caption",
    "both/match",
    "both/total",
)

IMAGE_SIZE = 64
QUADRANT_CENTRES: tuple[tuple[int, int], ...] = ((16, 16), (48, 16), (16, 48), (48, 48))
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (230, 200, 50),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
ALL_PAIRS: list[tuple[str, str]] = [(kind, color) for kind in KINDS for color in COLOR_NAMES]

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000
FADE_SAMPLES = 160  # 10 ms
MIN_GAP_SAMPLES = 1600  # 100 ms
PITCHES: dict[str, float] = {"low": 220.0, "middle": 440.0, "high": 880.0}
PITCH_NAMES: tuple[str, ...] = tuple(PITCHES)
WAVES: tuple[str, ...] = ("sine", "square", "sawtooth")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six")

ANSWERS: dict[str, tuple[str, ...]] = {
    "image/color": COLOR_NAMES,
    "image/shape": KINDS,
    "image/count": NUMBERS[:3],
    "image/where": POSITIONS,
    "audio/count": NUMBERS[:3],
    "audio/pitch": PITCH_NAMES,
    "audio/wave": WAVES,
    "both/match": ("yes", "no"),
    "both/total": NUMBERS[1:6],
}

FIXED_QUESTIONS: dict[str, str] = {
    "image/count": "How many shapes are there?",
    "image/caption": "Describe the image.",
    "audio/count": "How many beeps are there?",
    "audio/pitch": "Is the sound low, middle or high?",
    "audio/wave": "What kind of wave is it?",
    "audio/caption": "Describe the sound.",
    "both/match": "Are there as many beeps as shapes?",
    "both/total": "How many shapes and beeps are there together?",
}

TRAIN_RECORDS_PER_MEDIUM = 1.5
BALANCE_SLACK = 0.015  # extra turns may push an answer this far (relative) above its task's min

Option = tuple[str, str]  # (question, answer)
T = TypeVar("T")


@dataclass(frozen=True)
class WorldSize:
    """How big a world to generate.

    Attributes:
        n_train: Number of train records, spread evenly over the tasks by first turn.
        n_val_per_task: Single-turn val records per task.
        n_test_per_task: Single-turn test records per task.
        multi_turn_fraction: Fraction of train records holding 2 or 3 question-answer turns.
    """

    n_train: int = 20000
    n_val_per_task: int = 40
    n_test_per_task: int = 500
    multi_turn_fraction: float = 0.5


@dataclass(frozen=True)
class Shape:
    """One filled shape of an image.

    Attributes:
        quadrant: Index into ``POSITIONS``.
        kind: One of ``KINDS``.
        color: One of ``COLOR_NAMES``.
        rgb: The jittered fill colour.
        box: Inclusive bounding box ``(x0, y0, x1, y1)``.
    """

    quadrant: int
    kind: str
    color: str
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to render an image.

    Attributes:
        background: Gray level of the background.
        shapes: Shapes in reading order (by quadrant).
    """

    background: int
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Beep:
    """One beep of a clip, in samples.

    Attributes:
        start: First sample.
        length: Number of samples.
        amplitude: Peak amplitude.
    """

    start: int
    length: int
    amplitude: float


@dataclass(frozen=True)
class AudioSpec:
    """Everything needed to render an audio clip.

    Attributes:
        pitch: One of ``PITCH_NAMES``.
        frequency: The jittered frequency in Hz.
        wave: One of ``WAVES``.
        beeps: The beeps in time order.
        noise_std: Standard deviation of the background noise.
        noise_seed: Seed of the background noise.
    """

    pitch: str
    frequency: float
    wave: str
    beeps: tuple[Beep, ...]
    noise_std: float
    noise_seed: int


class _Rand:
    """Fast scalar draws from a buffered ``numpy.random.default_rng`` stream."""

    def __init__(self, seed: Sequence[int]) -> None:
        self._rng = np.random.default_rng(list(seed))
        self._buf: list[float] = []
        self._pos = 0

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        """Returns a float drawn uniformly from ``[low, high)``."""
        if self._pos == len(self._buf):
            self._buf = self._rng.random(4096).tolist()
            self._pos = 0
        value = self._buf[self._pos]
        self._pos += 1
        return low + (high - low) * value

    def integer(self, low: int, high: int) -> int:
        """Returns an int drawn uniformly from ``low..high`` inclusive."""
        return min(high, low + int(self.uniform() * (high - low + 1)))

    def choice(self, items: Sequence[T]) -> T:
        """Returns an element of ``items`` chosen uniformly."""
        return items[self.integer(0, len(items) - 1)]

    def permutation(self, n: int) -> list[int]:
        """Returns a uniformly random permutation of ``range(n)``."""
        order = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.integer(0, i)
            order[i], order[j] = order[j], order[i]
        return order

    def sample(self, n: int, k: int) -> list[int]:
        """Returns ``k`` distinct ints from ``range(n)`` in random order."""
        return self.permutation(n)[:k]

    def seed(self) -> int:
        """Returns a fresh 62-bit seed."""
        return int(self._rng.integers(2**62))


# ----------------------------------------------------------------------------- text


def image_caption(spec: ImageSpec) -> str:
    """Describes an image's shapes in reading order.

    Args:
        spec: The image.

    Returns:
        E.g. "a red circle at the top left, a blue square at the top right and a green
        triangle at the bottom right".
    """
    parts = [f"a {s.color} {s.kind} at the {POSITIONS[s.quadrant]}" for s in spec.shapes]
    return _join_and(parts)


def _join_and(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def audio_caption(spec: AudioSpec) -> str:
    """Describes a clip, e.g. "one low sine beep" or "three high square beeps"."""
    n = len(spec.beeps)
    return f"{NUMBERS[n - 1]} {spec.pitch} {spec.wave} beep{'s' if n > 1 else ''}"


def _color_question(kind: str) -> str:
    return f"What color is the {kind}?"


def _shape_question(color: str) -> str:
    return f"What shape is the {color} one?"


def _where_question(color: str, kind: str) -> str:
    return f"Where is the {color} {kind}?"


def question_templates() -> dict[str, list[str]]:
    """Lists every question the world can ask, by task.

    Returns:
        A dict from task to its possible question strings.
    """
    questions = {task: [q] for task, q in FIXED_QUESTIONS.items()}
    questions["image/color"] = [_color_question(k) for k in KINDS]
    questions["image/shape"] = [_shape_question(c) for c in COLOR_NAMES]
    questions["image/where"] = [_where_question(c, k) for c in COLOR_NAMES for k in KINDS]
    return {task: questions[task] for task in TASKS}


def vocabulary_corpus() -> list[str]:
    """Lists every question and answer string the world can produce (for tokenizer training).

    Short answers and questions are enumerated exhaustively; captions by a representative set
    holding every word and joining pattern.

    Returns:
        Distinct strings in a fixed order.
    """
    texts = [q for qs in question_templates().values() for q in qs]
    texts += [a for answers in ANSWERS.values() for a in answers]
    singles = [
        Shape(q, kind, color, COLORS[color], (0, 0, 0, 0))
        for color in COLOR_NAMES
        for kind in KINDS
        for q in range(4)
    ]
    texts += [image_caption(ImageSpec(200, (s,))) for s in singles]
    for i in range(0, len(singles) - 2, 3):
        shapes = tuple(sorted(singles[i : i + 3], key=lambda s: s.quadrant))
        texts += [image_caption(ImageSpec(200, shapes[:2])), image_caption(ImageSpec(200, shapes))]
    for n in range(1, 4):
        for pitch in PITCH_NAMES:
            for wave in WAVES:
                beeps = tuple(Beep(0, 1, 0.5) for _ in range(n))
                texts.append(audio_caption(AudioSpec(pitch, PITCHES[pitch], wave, beeps, 0.0, 0)))
    return list(dict.fromkeys(texts))


# ----------------------------------------------------------------------------- media specs


def _make_shape(rand: _Rand, quadrant: int, kind: str, color: str) -> Shape:
    cx, cy = QUADRANT_CENTRES[quadrant]
    cx += rand.integer(-4, 4)
    cy += rand.integer(-4, 4)
    side = rand.integer(14, 24)
    x0, y0 = cx - side // 2, cy - side // 2
    rgb = tuple(int(np.clip(v + rand.integer(-12, 12), 0, 255)) for v in COLORS[color])
    return Shape(quadrant, kind, color, rgb, (x0, y0, x0 + side - 1, y0 + side - 1))


def build_image(
    rand: _Rand, task: str, target: str | None, n_shapes: int | None = None
) -> tuple[ImageSpec, str | None]:
    """Draws an image whose answer to ``task`` is ``target``.

    The free parameters of the question (the kind, colour or pair asked about) are drawn
    uniformly, independently of the target answer.

    Args:
        rand: Random stream.
        task: The task the image is made for (any task; non-image tasks add no constraint).
        target: The wanted answer, or None for no constraint.
        n_shapes: Forces the number of shapes (for both/* tasks).

    Returns:
        The image and, for image/color, image/shape and image/where, the question asked.
    """
    if task == "image/count":
        n_shapes = NUMBERS.index(target) + 1
    n = n_shapes or rand.integer(1, 3)
    quadrants = rand.sample(4, n)
    others = ALL_PAIRS  # (kind, color) pairs allowed for the shapes not asked about
    pairs: list[tuple[str, str]] = []
    question = None
    if task == "image/color":
        kind = rand.choice(KINDS)
        pairs, question = [(kind, target)], _color_question(kind)
        others = [p for p in ALL_PAIRS if p[0] != kind]
    elif task == "image/shape":
        color = rand.choice(COLOR_NAMES)
        pairs, question = [(target, color)], _shape_question(color)
        others = [p for p in ALL_PAIRS if p[1] != color]
    elif task == "image/where":
        kind, color = rand.choice(KINDS), rand.choice(COLOR_NAMES)
        pairs, question = [(kind, color)], _where_question(color, kind)
        others = [p for p in ALL_PAIRS if p != (kind, color)]
        target_quadrant = POSITIONS.index(target)
        rest = [q for q in quadrants if q != target_quadrant]
        quadrants = [target_quadrant, *rest[: n - 1]]
    pairs += [rand.choice(others) for _ in range(n - len(pairs))]
    shapes = [_make_shape(rand, q, k, c) for q, (k, c) in zip(quadrants, pairs, strict=True)]
    background = rand.integer(190, 235)
    return ImageSpec(background, tuple(sorted(shapes, key=lambda s: s.quadrant))), question


def build_audio(
    rand: _Rand, task: str, target: str | None, n_beeps: int | None = None
) -> AudioSpec:
    """Draws a clip whose answer to ``task`` is ``target``.

    Args:
        rand: Random stream.
        task: The task the clip is made for (non-audio tasks add no constraint).
        target: The wanted answer, or None for no constraint.
        n_beeps: Forces the number of beeps (for both/* tasks).

    Returns:
        The clip's spec.
    """
    if task == "audio/count":
        n_beeps = NUMBERS.index(target) + 1
    n = n_beeps or rand.integer(1, 3)
    pitch = target if task == "audio/pitch" else rand.choice(PITCH_NAMES)
    wave = target if task == "audio/wave" else rand.choice(WAVES)
    frequency = round(PITCHES[pitch] * (1.0 + rand.uniform(-0.03, 0.03)), 3)
    return AudioSpec(
        pitch=pitch,
        frequency=frequency,
        wave=wave,
        beeps=_place_beeps(rand, n),
        noise_std=round(rand.uniform(0.002, 0.01), 5),
        noise_seed=rand.seed(),
    )


def _place_beeps(rand: _Rand, n: int) -> tuple[Beep, ...]:
    """Places ``n`` beeps of 120-200 ms at random, at least 100 ms apart, within the clip."""
    lengths = [rand.integer(1920, 3200) for _ in range(n)]
    slack = CLIP_SAMPLES - sum(lengths) - (n - 1) * MIN_GAP_SAMPLES
    cuts = sorted(rand.integer(0, slack) for _ in range(n))
    beeps, offset = [], 0
    for i, (cut, length) in enumerate(zip(cuts, lengths, strict=True)):
        amplitude = round(rand.uniform(0.3, 0.6), 4)
        beeps.append(Beep(cut + offset + i * MIN_GAP_SAMPLES, length, amplitude))
        offset += length
    return tuple(beeps)


def image_options(spec: ImageSpec) -> dict[str, list[Option]]:
    """Lists every (question, answer) that can be asked about an image, by task.

    Args:
        spec: The image.

    Returns:
        A dict from each image task to its options (possibly empty).
    """
    kinds = Counter(s.kind for s in spec.shapes)
    colors = Counter(s.color for s in spec.shapes)
    pairs = Counter((s.color, s.kind) for s in spec.shapes)
    shapes = spec.shapes
    return {
        "image/color": [(_color_question(s.kind), s.color) for s in shapes if kinds[s.kind] == 1],
        "image/shape": [(_shape_question(s.color), s.kind) for s in shapes if colors[s.color] == 1],
        "image/count": [(FIXED_QUESTIONS["image/count"], NUMBERS[len(shapes) - 1])],
        "image/where": [
            (_where_question(s.color, s.kind), POSITIONS[s.quadrant])
            for s in shapes
            if pairs[(s.color, s.kind)] == 1
        ],
        "image/caption": [(FIXED_QUESTIONS["image/caption"], image_caption(spec))],
    }


def audio_options(spec: AudioSpec) -> dict[str, list[Option]]:
    """Lists every (question, answer) that can be asked about a clip, by task.

    Args:
        spec: The clip.

    Returns:
        A dict from each audio task to its single option.
    """
    return {
        "audio/count": [(FIXED_QUESTIONS["audio/count"], NUMBERS[len(spec.beeps) - 1])],
        "audio/pitch": [(FIXED_QUESTIONS["audio/pitch"], spec.pitch)],
        "audio/wave": [(FIXED_QUESTIONS["audio/wave"], spec.wave)],
        "audio/caption": [(FIXED_QUESTIONS["audio/caption"], audio_caption(spec))],
    }


def both_options(n_shapes: int, n_beeps: int) -> dict[str, list[Option]]:
    """Lists the both/* (question, answer) pairs for a shape count and a beep count."""
    return {
        "both/match": [(FIXED_QUESTIONS["both/match"], "yes" if n_shapes == n_beeps else "no")],
        "both/total": [(FIXED_QUESTIONS["both/total"], NUMBERS[n_shapes + n_beeps - 1])],
    }


def _both_counts(rand: _Rand, task: str, target: str) -> tuple[int, int]:
    """Draws (shapes, beeps) uniformly among the pairs giving ``target`` for a both/* task."""
    pairs = [(s, b) for s in range(1, 4) for b in range(1, 4)]
    if task == "both/match":
        pairs = [(s, b) for s, b in pairs if (s == b) == (target == "yes")]
        if target == "yes":
            return pairs[rand.integer(0, 2)]
    else:
        pairs = [(s, b) for s, b in pairs if NUMBERS[s + b - 1] == target]
    return rand.choice(pairs)


# ----------------------------------------------------------------------------- rendering


def render_image(spec: ImageSpec) -> Image.Image:
    """Draws an image spec.

    Args:
        spec: The image.

    Returns:
        A 64x64 RGB image.
    """
    gray = spec.background
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (gray, gray, gray))
    draw = ImageDraw.Draw(image)
    for shape in spec.shapes:
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=shape.rgb)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=shape.rgb)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=shape.rgb)
    return image


def render_audio(spec: AudioSpec) -> np.ndarray:
    """Synthesises an audio spec.

    Beeps are gated segments of one continuous tone (phase follows absolute time).

    Args:
        spec: The clip.

    Returns:
        ``CLIP_SAMPLES`` float64 samples in [-1, 1].
    """
    noise_rng = np.random.default_rng(spec.noise_seed)
    signal = noise_rng.normal(0.0, spec.noise_std, CLIP_SAMPLES)
    ramp = np.arange(FADE_SAMPLES) / FADE_SAMPLES
    for beep in spec.beeps:
        index = np.arange(beep.start, beep.start + beep.length)
        phase = (spec.frequency * index / SAMPLE_RATE) % 1.0
        if spec.wave == "sine":
            tone = np.sin(2.0 * np.pi * phase)
        elif spec.wave == "square":
            tone = np.where(phase < 0.5, 1.0, -1.0)
        else:
            tone = 2.0 * phase - 1.0
        envelope = np.ones(beep.length)
        envelope[:FADE_SAMPLES] = ramp
        envelope[-FADE_SAMPLES:] = ramp[::-1]
        signal[beep.start : beep.start + beep.length] += beep.amplitude * tone * envelope
    return np.clip(signal, -1.0, 1.0)


def _render_job(job: tuple[str, ImageSpec | AudioSpec]) -> None:
    """Renders one media file (encoding in memory first is much faster than file-wise I/O)."""
    path, spec = job
    buffer = io.BytesIO()
    if isinstance(spec, ImageSpec):
        render_image(spec).save(buffer, format="PNG")
    else:
        sf.write(buffer, render_audio(spec), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    Path(path).write_bytes(buffer.getvalue())


def _render_all(jobs: list[tuple[str, ImageSpec | AudioSpec]], workers: int) -> None:
    if workers <= 1 or len(jobs) < 64:
        for job in jobs:
            _render_job(job)
        return
    chunksize = max(1, len(jobs) // (workers * 16))
    with multiprocessing.Pool(workers) as pool:
        for _ in pool.imap_unordered(_render_job, jobs, chunksize=chunksize):
            pass


# ----------------------------------------------------------------------------- planning


@dataclass(eq=False)
class _Medium:
    """A planned media file of a split."""

    number: int
    spec: ImageSpec | AudioSpec
    options: dict[str, list[Option]]
    uses: int = 0

    @property
    def count(self) -> int:
        """Number of shapes or beeps."""
        spec = self.spec
        return len(spec.shapes) if isinstance(spec, ImageSpec) else len(spec.beeps)


@dataclass(eq=False)
class _Record:
    """A planned record: first-turn task, target answer, media and turns."""

    index: int
    task: str
    target: str | None
    image: _Medium | None = None
    audio: _Medium | None = None
    shape_beep_counts: tuple[int, int] | None = None
    turns: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def needs_image(self) -> bool:
        """Whether the first-turn task shows an image."""
        return not self.task.startswith("audio/")

    @property
    def needs_audio(self) -> bool:
        """Whether the first-turn task plays a clip."""
        return not self.task.startswith("image/")

    @property
    def has_media(self) -> bool:
        """Whether every medium the first-turn task needs is decided."""
        image_ok = self.image is not None or not self.needs_image
        return image_ok and (self.audio is not None or not self.needs_audio)


def _asked_key(
    task: str, question: str, image: _Medium | None, audio: _Medium | None
) -> tuple[int, int, str]:
    """Identifies a question about the media it concerns (both/* tasks: the pair)."""
    image_number = -1 if task.startswith("audio/") or image is None else image.number
    audio_number = -1 if task.startswith("image/") or audio is None else audio.number
    return image_number, audio_number, question


def _tasks_per_split(split: str, size: WorldSize) -> list[int]:
    if split == "train":
        base, extra = divmod(size.n_train, len(TASKS))
        return [base + (i < extra) for i in range(len(TASKS))]
    per_task = size.n_val_per_task if split == "val" else size.n_test_per_task
    return [per_task] * len(TASKS)


def _cycled_answers(rand: _Rand, task: str, n: int) -> list[str | None]:
    """Cycles through a task's answers in a shuffled order (None for caption tasks)."""
    answers = ANSWERS.get(task)
    if answers is None:
        return [None] * n
    order = rand.permutation(len(answers))
    return [answers[order[i % len(answers)]] for i in range(n)]


class _SplitPlanner:
    """Plans the records and media of one split; all randomness comes from one stream."""

    def __init__(self, split: str, seed: int, size: WorldSize) -> None:
        self.split = split
        self.size = size
        self.rand = _Rand([seed, SPLITS.index(split)])
        self.images: list[_Medium] = []
        self.audios: list[_Medium] = []
        self.counts = {task: dict.fromkeys(answers, 0) for task, answers in ANSWERS.items()}
        self.tolerance: dict[str, int] = {}
        self.asked: set[tuple[int, int, str]] = set()  # (image, audio, question); -1: none

    def plan(self) -> list[_Record]:
        """Returns the split's records, with media and turns decided."""
        records = self._first_turn_targets()
        fresh_images, fresh_audios = self._fresh_flags(records)
        for record in records:
            self._make_fresh(record, record.index in fresh_images, record.index in fresh_audios)
        for record in records:
            if record.has_media:
                self._first_turn(record)
        for record in records:
            if not record.has_media:
                self._reuse_media(record)
                self._first_turn(record)
        for task, answers in ANSWERS.items():
            mean = sum(self.counts[task].values()) / len(answers)
            self.tolerance[task] = max(1, int(BALANCE_SLACK * mean))
        if self.split == "train":
            self._add_extra_turns(records)
        return records

    def _first_turn_targets(self) -> list[_Record]:
        pairs = []
        for task, n in zip(TASKS, _tasks_per_split(self.split, self.size), strict=True):
            pairs += [(task, target) for target in _cycled_answers(self.rand, task, n)]
        order = self.rand.permutation(len(pairs))
        return [_Record(i, *pairs[j]) for i, j in enumerate(order)]

    def _fresh_flags(self, records: list[_Record]) -> tuple[set[int], set[int]]:
        """Chooses which records create new media (all of them outside train)."""
        need_image = [r.index for r in records if r.needs_image]
        need_audio = [r.index for r in records if r.needs_audio]
        if self.split != "train":
            return set(need_image), set(need_audio)
        n_media = math.ceil(max(len(need_image), len(need_audio)) / TRAIN_RECORDS_PER_MEDIUM)
        n_image, n_audio = min(n_media, len(need_image)), min(n_media, len(need_audio))
        fresh_image = {need_image[i] for i in self.rand.sample(len(need_image), n_image)}
        fresh_audio = {need_audio[i] for i in self.rand.sample(len(need_audio), n_audio)}
        return fresh_image, fresh_audio

    def _make_fresh(self, record: _Record, fresh_image: bool, fresh_audio: bool) -> None:
        task, target = record.task, record.target
        n_shapes = n_beeps = None
        if task.startswith("both/") and record.shape_beep_counts is None:
            record.shape_beep_counts = _both_counts(self.rand, task, target)
        if record.shape_beep_counts is not None:
            n_shapes, n_beeps = record.shape_beep_counts
        if fresh_image:
            spec, question = build_image(self.rand, task, target, n_shapes)
            record.image = self._add_medium(self.images, record.index, spec, image_options(spec))
            if question is not None:
                record.turns.append((task, question, target))
        if fresh_audio:
            spec = build_audio(self.rand, task, target, n_beeps)
            record.audio = self._add_medium(self.audios, record.index, spec, audio_options(spec))

    @staticmethod
    def _add_medium(
        pool: list[_Medium], number: int, spec: ImageSpec | AudioSpec, options: dict
    ) -> _Medium:
        medium = _Medium(number, spec, options)
        pool.append(medium)
        return medium

    def _reuse_media(self, record: _Record) -> None:
        """Picks existing media for a record that creates none (or makes new ones if none fit)."""
        if record.needs_image and record.image is None:
            picked = self._pick(self.images, self._wanted(record, 0))
            if picked is None:
                self._make_fresh(record, True, False)
            else:
                medium, question = picked
                record.image = medium
                if record.task.startswith("image/"):
                    answer = dict(medium.options[record.task])[question]
                    record.turns.append((record.task, question, answer))
        if record.needs_audio and record.audio is None:
            picked = self._pick(self.audios, self._wanted(record, 1))
            if picked is None:
                self._make_fresh(record, False, True)
            else:
                record.audio = picked[0]

    def _wanted(self, record: _Record, which: int) -> Callable[[_Medium], list[str]]:
        """Returns what a reused medium may be asked for the record's first turn.

        Args:
            record: The record.
            which: 0 for its image, 1 for its clip (the count needed by a both/* task).

        Returns:
            A function from a medium to the fitting first-turn questions not yet asked of it
            (for both/* tasks, a placeholder when its shape or beep count fits).
        """
        task, target, counts = record.task, record.target, record.shape_beep_counts

        def wanted(medium: _Medium) -> list[str]:
            if counts is not None:
                return ["*"] if medium.count == counts[which] else []
            return [
                q
                for q, a in medium.options.get(task, [])
                if (target is None or a == target)
                and _asked_key(task, q, medium if which == 0 else None, medium) not in self.asked
            ]

        return wanted

    def _pick(
        self, pool: list[_Medium], wanted: Callable[[_Medium], list[str]]
    ) -> tuple[_Medium, str] | None:
        """Samples media at random and returns the least used one that fits, with a question."""
        if not pool:
            return None
        for _ in range(4):
            best = None
            for _ in range(32):
                medium = pool[self.rand.integer(0, len(pool) - 1)]
                questions = wanted(medium)
                if questions and (best is None or medium.uses < best[0].uses):
                    best = (medium, questions)
            if best is not None:
                return best[0], self.rand.choice(best[1])
        return None

    def _first_turn(self, record: _Record) -> None:
        """Completes the first turn and counts its answer and media uses."""
        if not record.turns:  # audio and both tasks: the question is fixed
            question, answer = self._options(record)[record.task][0]
            record.turns.append((record.task, question, answer))
        task, question, answer = record.turns[0]
        assert record.target is None or answer == record.target, (record, answer)
        for medium in (record.image, record.audio):
            if medium is not None:
                medium.uses += 1
        self._count_turn(record, task, question, answer)

    def _count_turn(self, record: _Record, task: str, question: str, answer: str) -> None:
        """Counts a turn's answer and marks its question as asked of its media."""
        self.asked.add(_asked_key(task, question, record.image, record.audio))
        if task in self.counts:
            self.counts[task][answer] += 1

    @staticmethod
    def _options(record: _Record) -> dict[str, list[Option]]:
        options: dict[str, list[Option]] = {}
        if record.image is not None:
            options.update(record.image.options)
        if record.audio is not None:
            options.update(record.audio.options)
        if record.image is not None and record.audio is not None:
            options.update(both_options(record.image.count, record.audio.count))
        return options

    def _add_extra_turns(self, records: list[_Record]) -> None:
        n_multi = round(self.size.multi_turn_fraction * len(records))
        multi = set(self.rand.sample(len(records), n_multi))
        for record in records:
            if record.index in multi:
                for _ in range(self.rand.integer(1, 2)):
                    self._add_turn(record)

    def _excess(self, task: str, answer: str) -> int:
        """How far an answer's count is above its task's least represented answer."""
        if task not in self.counts:
            return 0
        counts = self.counts[task]
        return counts[answer] - min(counts.values())

    def _add_turn(self, record: _Record) -> None:
        """Adds a turn with another task, preferring under-represented answers.

        A task is drawn uniformly among the unused tasks having an option whose answer is within
        the tolerance of its task's least represented answer; within it, the option with the
        least represented answer is taken. Questions already asked of the same media (by any
        record) are avoided unless nothing else is left.
        """
        used = {task for task, _, _ in record.turns}
        options = {t: o for t, o in self._options(record).items() if t not in used and o}
        fresh = {
            task: [
                o
                for o in opts
                if _asked_key(task, o[0], record.image, record.audio) not in self.asked
            ]
            for task, opts in options.items()
        }
        candidates = {task: opts for task, opts in fresh.items() if opts} or options
        allowed = {
            task: opts
            for task, opts in candidates.items()
            if any(self._excess(task, a) <= self.tolerance.get(task, 0) for _, a in opts)
        }
        pool = allowed or candidates
        if not pool:
            return
        task = self.rand.choice(sorted(pool))
        best = min(self._excess(task, a) for _, a in pool[task])
        question, answer = self.rand.choice(
            [o for o in pool[task] if self._excess(task, o[1]) == best]
        )
        record.turns.append((task, question, answer))
        self._count_turn(record, task, question, answer)


# ----------------------------------------------------------------------------- writing


def _media_path(kind: str, split: str, number: int) -> str:
    folder, ext = ("images", "png") if kind == "image" else ("audio", "wav")
    return f"{folder}/{split}-{number:06d}.{ext}"


def _record_json(split: str, record: _Record) -> dict:
    media = []
    if record.image is not None:
        media.append({"type": "image", "path": _media_path("image", split, record.image.number)})
    if record.audio is not None:
        media.append({"type": "audio", "path": _media_path("audio", split, record.audio.number)})
    messages = []
    for i, (_, question, answer) in enumerate(record.turns):
        content = (media if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {
        "id": f"{split}-{record.index:06d}",
        "task": record.task,
        "turn_tasks": [task for task, _, _ in record.turns],
        "messages": messages,
    }


def _meta_json(split: str, record: _Record) -> dict:
    meta: dict = {
        "id": f"{split}-{record.index:06d}",
        "turns": [{"task": t, "question": q, "answer": a} for t, q, a in record.turns],
    }
    if record.image is not None:
        path = _media_path("image", split, record.image.number)
        meta["image"] = {"path": path, **asdict(record.image.spec)}
    if record.audio is not None:
        path = _media_path("audio", split, record.audio.number)
        meta["audio"] = {"path": path, **asdict(record.audio.spec)}
    return meta


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _split_summary(records: list[_Record]) -> dict:
    images = {id(r.image) for r in records if r.image is not None}
    audios = {id(r.audio) for r in records if r.audio is not None}
    first_tasks = Counter(r.task for r in records)
    answers = {task: dict.fromkeys(ANSWERS[task], 0) for task in ANSWERS}
    for record in records:
        for task, _, answer in record.turns:
            if task in answers:
                answers[task][answer] += 1
    return {
        "records": len(records),
        "turns": sum(len(r.turns) for r in records),
        "multi_turn_records": sum(len(r.turns) > 1 for r in records),
        "images": len(images),
        "audio": len(audios),
        "records_per_task": {task: first_tasks[task] for task in TASKS},
        "answer_counts": answers,
    }


def _build(tmp: Path, seed: int, size: WorldSize, workers: int) -> dict:
    """Plans and writes a whole world into ``tmp``; returns the manifest."""
    (tmp / "images").mkdir(parents=True)
    (tmp / "audio").mkdir()
    (tmp / "meta").mkdir()
    jobs: list[tuple[str, ImageSpec | AudioSpec]] = []
    splits = {}
    for split in SPLITS:
        records = _SplitPlanner(split, seed, size).plan()
        _write_jsonl(tmp / f"{split}.jsonl", (_record_json(split, r) for r in records))
        _write_jsonl(tmp / "meta" / f"{split}.jsonl", (_meta_json(split, r) for r in records))
        for kind, pool in (
            ("image", [r.image for r in records]),
            ("audio", [r.audio for r in records]),
        ):
            unique = {m.number: m for m in pool if m is not None}
            jobs += [
                (str(tmp / _media_path(kind, split, n)), m.spec) for n, m in sorted(unique.items())
            ]
        splits[split] = _split_summary(records)
    _render_all(jobs, workers)
    return {"version": WORLD_VERSION, "seed": seed, "size": asdict(size), "splits": splits}


def _matching_manifest(out: Path, seed: int, size: WorldSize) -> dict | None:
    path = out / "world.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = (
        manifest.get("version") == WORLD_VERSION
        and manifest.get("seed") == seed
        and manifest.get("size") == asdict(size)
    )
    return manifest if same else None


def generate_world(
    out_dir: str | Path, seed: int = 0, size: WorldSize = WorldSize(), workers: int = 2
) -> dict:
    """Generates the shapes-and-sounds world, or reuses an identical one already there.

    Writes ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``images/``, ``audio/``, ``meta/`` and
    finally ``world.json`` under ``out_dir``. The world is built in a temporary folder inside
    ``out_dir`` and moved into place before ``world.json`` is written, so a half-written world
    is never taken as complete. Only the names above are replaced in ``out_dir``.

    Args:
        out_dir: Output folder (created if needed).
        seed: Seed of every random choice.
        size: Number of records.
        workers: Processes rendering media; the output does not depend on it.

    Returns:
        The manifest: version, seed, size and per-split counts (records, turns, multi-turn
        records, distinct images and audio clips, records per task, answer counts per task).
    """
    out = Path(out_dir)
    existing = _matching_manifest(out, seed, size)
    if existing is not None:
        print(f"world: {out} already holds the world for seed {seed} and this size; reusing it")
        return existing
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)
    tmp = out / ".world-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = _build(tmp, seed, size, workers)
    names = ["images", "audio", "meta"] + [f"{split}.jsonl" for split in SPLITS]
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (tmp / name).rename(target)
    (tmp / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (tmp / "world.json").rename(out / "world.json")
    tmp.rmdir()
    return manifest


def summarize(manifest: dict) -> str:
    """Formats a manifest as a few human-readable lines."""
    lines = [f"world seed {manifest['seed']} (version {manifest['version']})"]
    for split, info in manifest["splits"].items():
        lines.append(
            f"  {split}: {info['records']} records, {info['turns']} turns "
            f"({info['multi_turn_records']} multi-turn), {info['images']} images, "
            f"{info['audio']} audio clips"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: generates a world and prints its summary.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).
    """
    defaults = WorldSize()
    parser = argparse.ArgumentParser(description="Generate the shapes-and-sounds world.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-val-per-task", type=int, default=defaults.n_val_per_task)
    parser.add_argument("--n-test-per-task", type=int, default=defaults.n_test_per_task)
    parser.add_argument("--multi-turn-fraction", type=float, default=defaults.multi_turn_fraction)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    size = WorldSize(
        args.n_train, args.n_val_per_task, args.n_test_per_task, args.multi_turn_fraction
    )
    manifest = generate_world(args.out, args.seed, size, args.workers)
    print(summarize(manifest))


if __name__ == "__main__":
    main()
