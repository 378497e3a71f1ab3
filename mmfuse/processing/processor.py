"""Conversation record -> Sample.

Checks, in order (each failure a ``RecordError`` with a reason from ``processing.errors``):
the schema (``invalid record``), empty turns (``empty text``), an assistant turn to supervise
(``no assistant turn``), media parts in user turns only and no placeholder typed into the text
(``media mismatch``); then the conversation is rendered and, when longer than
``max_length``, its oldest turns are dropped until it fits (the system message and the last
exchange are always kept; ``Sample.truncated_turns`` counts what was dropped, and a record
whose last exchange alone is too long is ``too long``: an answer is never cut); the rendered
placeholders must match the media parts (``media mismatch``) and some token must be supervised
(``no supervised token``); last, the media of the kept turns are loaded (missing, empty,
truncated, oversized or unreadable files, each its own reason).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from mmfuse.processing.audio import AudioProcessor
from mmfuse.processing.errors import (
    EMPTY_TEXT,
    INVALID_RECORD,
    MEDIA_MISMATCH,
    NO_ASSISTANT_TURN,
    NO_SUPERVISED_TOKEN,
    TOO_LONG,
    InputError,
    RecordError,
)
from mmfuse.processing.image import ImageProcessor
from mmfuse.processing.text import (
    AUDIO_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    encode_conversation,
    last_supervised_run,
    message_text,
    user_text,
)
from mmfuse.types import MODALITIES, Sample

_ROLES = {"system", "user", "assistant"}
PROMPT_TURNS = ("all", "last")
_PLACEHOLDER_TOKENS = {"image": IMAGE_TOKEN, "audio": AUDIO_TOKEN}
# placeholders that must not be typed into text: media go in parts, the template adds them
_TYPED_PLACEHOLDERS = (IMAGE_TOKEN, AUDIO_TOKEN, "<image>", "<audio>")


class Processor:
    """Turns one conversation record (the schema in DESIGN.md) into a ``Sample``.

    Args:
        tokenizer: a tokenizer with a chat template (with ``{% generation %}`` blocks or
            without: ``text.encode_conversation``).
        image: loader for image parts.
        audio: loader for audio parts.
        max_length: longest token sequence; longer conversations lose their oldest turns.
        max_prompt_length: user-text tokens kept for the text encoder.
        prompt_turns: what the text encoder reads: ``all`` the user turns' text, or the
            ``last`` one's (the question being answered; train with ``data.turns=each``,
            ``each_alone`` or ``each_both`` so that every answer is supervised after its own
            question).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image: ImageProcessor,
        audio: AudioProcessor,
        max_length: int = 512,
        max_prompt_length: int = 64,
        prompt_turns: str = "all",
    ) -> None:
        if prompt_turns not in PROMPT_TURNS:
            raise ValueError(
                f"processor.prompt_turns must be one of {PROMPT_TURNS}, got {prompt_turns!r}"
            )
        self.tokenizer = tokenizer
        self.image = image
        self.audio = audio
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.prompt_turns = prompt_turns

    @property
    def augments(self) -> bool:
        """Whether training augmentation changes any media input."""
        return self.image.augments or self.audio.augments

    def __call__(
        self,
        record: dict,
        base_dir: str | Path,
        source: str = "<memory>",
        for_generation: bool = False,
        drop_modalities: Sequence[str] = (),
        augment_seed: int | None = None,
        features: Mapping[str, torch.Tensor | InputError] | None = None,
        empty_reply_ok: bool = False,
        last_answer_only: bool = False,
    ) -> Sample:
        """Processes ``record``; media paths are relative to ``base_dir``.

        Args:
            record: a conversation record.
            base_dir: directory the record's media paths are relative to.
            source: file the record came from, for error messages.
            for_generation: drop the last assistant turn, keep it as ``reference`` (and, with
                the record's optional ``"references"`` list, every acceptable answer as
                ``all_references``) and end the prompt with the assistant header.
            drop_modalities: media kinds to remove from the record (a blind evaluation).
            augment_seed: apply the media loaders' training augmentation with this seed
                (training only; None: no augmentation).
            features: cached encoder features per modality (or the error met when they were
                computed), used instead of loading that modality's file.
            empty_reply_ok: accept assistant turns without text (a saved chat in which the
                model answered nothing); otherwise they are ``empty text`` errors.
            last_answer_only: supervise the last assistant turn only (the earlier ones are
                context; ``data.turns``).

        Raises:
            RecordError: naming the file, the record and the reason.
        """
        record_id = str(record.get("id", "<no id>"))
        try:
            messages = _validated_messages(record, empty_reply_ok=empty_reply_ok)
            messages = [_without_media(m, drop_modalities) for m in messages]
            reference, references = None, None
            if for_generation:
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                reference = message_text(messages[last])
                references = record_references(record, reference)
                messages = messages[:last]
            messages, input_ids, labels, dropped = self._fit(messages, for_generation)
            if last_answer_only:
                labels = last_supervised_run(labels)
            if not for_generation and all(label == IGNORE_INDEX for label in labels):
                raise InputError(
                    "no supervised token: the assistant turns render to nothing",
                    NO_SUPERVISED_TOKEN,
                )
            media = self._load_media(messages, Path(base_dir), augment_seed, features)
        except RecordError:
            raise
        except InputError as err:
            raise RecordError(source, record_id, str(err), err.reason) from err
        except (ValueError, TemplateError) as err:
            raise RecordError(source, record_id, str(err), INVALID_RECORD) from err
        sample = self._to_sample(record, record_id, messages, media, input_ids, reference)
        sample.labels = torch.tensor(labels, dtype=torch.long)
        sample.all_references = references
        sample.truncated_turns = dropped
        return sample

    def prompt(self, messages: Sequence[dict], base_dir: str | Path = ".") -> Sample:
        """Processes a conversation that ends with a user turn, for generation (chat).

        Raises:
            RecordError: naming the reason (source ``<chat>``).
        """
        try:
            checked = _validated_messages(
                {"messages": list(messages)}, require_assistant=False, empty_reply_ok=True
            )
            checked, input_ids, _, dropped = self._fit(checked, True)
            media = self._load_media(checked, Path(base_dir))
        except InputError as err:
            raise RecordError("<chat>", "<chat>", str(err), err.reason) from err
        except (ValueError, TemplateError) as err:
            raise RecordError("<chat>", "<chat>", str(err), INVALID_RECORD) from err
        sample = self._to_sample({"id": "<chat>"}, "<chat>", checked, media, input_ids, None)
        sample.truncated_turns = dropped
        return sample

    def _fit(
        self, messages: list[dict], for_generation: bool
    ) -> tuple[list[dict], list[int], list[int], int]:
        """Renders ``messages``, dropping the oldest turns until ``max_length`` holds.

        Returns:
            (kept messages, input ids, labels, number of messages dropped).
        """
        input_ids, labels = encode_conversation(self.tokenizer, messages, for_generation)
        kept = messages
        while len(input_ids) > self.max_length:
            shorter = _without_oldest_turn(kept)
            if shorter is None:
                raise InputError(
                    f"{len(input_ids)} tokens, more than max_length={self.max_length}, "
                    "with only the last exchange left (an answer is never cut)",
                    TOO_LONG,
                )
            kept = shorter
            input_ids, labels = encode_conversation(self.tokenizer, kept, for_generation)
        self._check_placeholders(kept, input_ids)
        return kept, input_ids, labels, len(messages) - len(kept)

    def _check_placeholders(self, messages: list[dict], input_ids: list[int]) -> None:
        """Each media part renders to one placeholder token (when the tokenizer has it)."""
        for kind, token in _PLACEHOLDER_TOKENS.items():
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                continue  # a tokenizer without the token: the text holds it as pieces
            parts = sum(p.get("type") == kind for m in messages for p in m["content"])
            rendered = input_ids.count(token_id)
            if rendered != parts:
                raise InputError(
                    f"media mismatch: the chat template rendered {rendered} {token} "
                    f"placeholder(s) for {parts} {kind} part(s)",
                    MEDIA_MISMATCH,
                )

    def _load_media(
        self,
        messages: list[dict],
        base_dir: Path,
        augment_seed: int | None = None,
        features: Mapping[str, torch.Tensor | InputError] | None = None,
    ) -> dict[str, torch.Tensor | tuple[str, torch.Tensor]]:
        """``{kind: tensor}`` for loaded media, ``{kind: ("features", tensor)}`` for cached."""
        media: dict[str, torch.Tensor | tuple[str, torch.Tensor]] = {}
        for message in messages:
            for part in message["content"]:
                kind = part.get("type")
                if kind not in MODALITIES:
                    continue
                if kind in media:
                    raise InputError(
                        f"media mismatch: more than one {kind} part; one per record is supported",
                        MEDIA_MISMATCH,
                    )
                if features is not None and kind in features:
                    cached = features[kind]
                    if isinstance(cached, InputError):
                        raise cached
                    media[kind] = ("features", cached)
                    continue
                loader = self.image if kind == "image" else self.audio
                if "data" in part:  # bytes already in memory (a server request)
                    media[kind] = loader.load(io.BytesIO(part["data"]), augment_seed)
                elif "path" in part:
                    media[kind] = loader.load(base_dir / str(part["path"]), augment_seed)
                else:
                    raise InputError(f"{kind} part has no 'path'", INVALID_RECORD)
        return media

    def _to_sample(
        self,
        record: dict,
        record_id: str,
        messages: list[dict],
        media: dict[str, torch.Tensor | tuple[str, torch.Tensor]],
        input_ids: list[int],
        reference: str | None,
    ) -> Sample:
        read = messages  # user_text reads the user turns of these
        if self.prompt_turns == "last":
            read = [m for m in messages if m["role"] == "user"][-1:]
        prompt = self.tokenizer(user_text(read), add_special_tokens=False)["input_ids"]
        features = {k: v[1] for k, v in media.items() if isinstance(v, tuple)}
        loaded = {k: v for k, v in media.items() if not isinstance(v, tuple)}
        has_audio = "audio" in loaded or "audio" in features
        return Sample(
            id=record_id,
            task=str(record.get("task", "")),
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            labels=torch.full((len(input_ids),), IGNORE_INDEX, dtype=torch.long),
            prompt_ids=torch.tensor(prompt[: self.max_prompt_length], dtype=torch.long),
            image=loaded.get("image"),
            audio=loaded.get("audio"),
            reference=reference,
            features=features,
            audio_chunk=self.audio.chunk_samples if has_audio else 0,
        )


def _validated_messages(
    record: dict, require_assistant: bool = True, empty_reply_ok: bool = False
) -> list[dict]:
    """Checks the schema and returns messages with list-of-parts content.

    ``empty_reply_ok``: an assistant turn without text is accepted (chat history: a model may
    answer nothing); in a training or evaluation record it is an ``empty text`` error.

    Raises:
        InputError: ``invalid record``, ``empty text``, ``media mismatch`` or
            ``no assistant turn``.
    """
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("'messages' must be a non-empty list", INVALID_RECORD)
    normalised = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise InputError(f"message {index} needs a role in {sorted(_ROLES)}", INVALID_RECORD)
        role, content = message["role"], message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise InputError(
                f"message {index} content must be a string or a list of parts", INVALID_RECORD
            )
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", *MODALITIES):
                raise InputError(
                    f"message {index} has a part of unknown type: {part!r}", INVALID_RECORD
                )
            if part["type"] == "text":
                _check_text_part(index, part)
            elif role != "user":
                raise InputError(
                    f"media mismatch: message {index} ({role}) has a {part['type']} part; "
                    "media belong in user turns",
                    MEDIA_MISMATCH,
                )
        _check_not_empty(index, role, content, empty_reply_ok)
        normalised.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in normalised):
        raise InputError(
            "no assistant turn: nothing to supervise or to use as reference", NO_ASSISTANT_TURN
        )
    return normalised


def _check_text_part(index: int, part: dict) -> None:
    text = part.get("text")
    if text is not None and not isinstance(text, str):
        raise InputError(f"message {index}: a text part's 'text' must be a string", INVALID_RECORD)
    for placeholder in _TYPED_PLACEHOLDERS:
        if placeholder in (text or ""):
            raise InputError(
                f"media mismatch: message {index} has {placeholder!r} typed in its text; "
                "media go in image/audio parts, which the chat template turns into "
                "placeholders",
                MEDIA_MISMATCH,
            )


def _check_not_empty(
    index: int, role: str, content: list[dict], empty_reply_ok: bool = False
) -> None:
    text = "".join(p.get("text") or "" for p in content if p["type"] == "text")
    has_media = any(p["type"] in MODALITIES for p in content)
    if role == "assistant" and empty_reply_ok:
        return
    if role == "assistant" and not text.strip():
        raise InputError(f"empty text: assistant turn {index} has no text", EMPTY_TEXT)
    if not text.strip() and not has_media:
        raise InputError(f"empty text: {role} turn {index} has neither text nor media", EMPTY_TEXT)


def _without_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """``messages`` without its oldest exchange (a user turn and the turns up to the next
    user turn), keeping leading system messages; None when only one exchange is left."""
    start = 0
    while start < len(messages) and messages[start]["role"] == "system":
        start += 1
    users = [i for i in range(start, len(messages)) if messages[i]["role"] == "user"]
    later = [i for i in users if i > start]
    if not later:
        return None
    return messages[:start] + messages[later[0] :]


def record_references(record: dict, reference: str) -> list[str]:
    """The record's optional ``"references"`` (all acceptable answers), else ``[reference]``."""
    given = record.get("references")
    if given is None:
        return [reference]
    if not isinstance(given, list) or not given or not all(isinstance(r, str) for r in given):
        raise ValueError("'references' must be a non-empty list of strings")
    return list(given)


def _without_media(message: dict, drop: Sequence[str]) -> dict:
    if not drop:
        return message
    content = [p for p in message["content"] if p.get("type") not in drop]
    return {"role": message["role"], "content": content}
