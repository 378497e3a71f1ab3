"""Conversation record -> Sample."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mmfuse.processing.audio import AudioProcessor
from mmfuse.processing.errors import MediaError, RecordError
from mmfuse.processing.image import ImageProcessor
from mmfuse.processing.text import IGNORE_INDEX, encode_conversation, message_text, user_text
from mmfuse.types import MODALITIES, Sample

_ROLES = {"system", "user", "assistant"}


class Processor:
    """Turns one conversation record (the schema in DESIGN.md) into a ``Sample``.

    Args:
        tokenizer: a tokenizer with a chat template that marks assistant tokens.
        image: loader for image parts.
        audio: loader for audio parts.
        max_length: longest token sequence accepted; longer records are an error.
        max_prompt_length: user-text tokens kept for the text encoder.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image: ImageProcessor,
        audio: AudioProcessor,
        max_length: int = 512,
        max_prompt_length: int = 64,
    ) -> None:
        self.tokenizer = tokenizer
        self.image = image
        self.audio = audio
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length

    def __call__(
        self,
        record: dict,
        base_dir: str | Path,
        source: str = "<memory>",
        for_generation: bool = False,
        drop_modalities: Sequence[str] = (),
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

        Raises:
            RecordError: naming the file, the record and the reason.
        """
        record_id = str(record.get("id", "<no id>"))
        try:
            messages = _validated_messages(record)
            messages = [_without_media(m, drop_modalities) for m in messages]
            media = self._load_media(messages, Path(base_dir))
            return self._sample(record, record_id, messages, media, for_generation)
        except (MediaError, ValueError) as err:
            if isinstance(err, RecordError):
                raise
            raise RecordError(source, record_id, str(err)) from err

    def prompt(self, messages: Sequence[dict], base_dir: str | Path = ".") -> Sample:
        """Processes a conversation that ends with a user turn, for generation (chat).

        Raises:
            RecordError: naming the reason (source ``<chat>``).
        """
        try:
            checked = _validated_messages({"messages": list(messages)}, require_assistant=False)
            media = self._load_media(checked, Path(base_dir))
            input_ids, labels = encode_conversation(self.tokenizer, checked, True)
            return self._to_sample(
                {"id": "<chat>"}, "<chat>", checked, media, input_ids, labels, None
            )
        except (MediaError, ValueError) as err:
            raise RecordError("<chat>", "<chat>", str(err)) from err

    def _load_media(self, messages: list[dict], base_dir: Path) -> dict[str, torch.Tensor]:
        media: dict[str, torch.Tensor] = {}
        for message in messages:
            for part in message["content"]:
                kind = part.get("type")
                if kind not in MODALITIES:
                    continue
                if kind in media:
                    raise ValueError(f"more than one {kind} part; one per record is supported")
                loader = self.image if kind == "image" else self.audio
                if "data" in part:  # bytes already in memory (a server request)
                    media[kind] = loader.load(io.BytesIO(part["data"]))
                elif "path" in part:
                    media[kind] = loader.load(base_dir / part["path"])
                else:
                    raise ValueError(f"{kind} part has no 'path'")
        return media

    def _sample(
        self,
        record: dict,
        record_id: str,
        messages: list[dict],
        media: dict[str, torch.Tensor],
        for_generation: bool,
    ) -> Sample:
        reference, references = None, None
        if for_generation:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            reference = message_text(messages[last])
            references = record_references(record, reference)
            messages = messages[:last]
        input_ids, labels = encode_conversation(self.tokenizer, messages, for_generation)
        if not for_generation and all(label == IGNORE_INDEX for label in labels):
            raise ValueError("no supervised token: the assistant turns render to nothing")
        sample = self._to_sample(record, record_id, messages, media, input_ids, labels, reference)
        sample.all_references = references
        return sample

    def _to_sample(
        self,
        record: dict,
        record_id: str,
        messages: list[dict],
        media: dict[str, torch.Tensor],
        input_ids: list[int],
        labels: list[int],
        reference: str | None,
    ) -> Sample:
        if len(input_ids) > self.max_length:
            raise ValueError(f"{len(input_ids)} tokens, more than max_length={self.max_length}")
        prompt = self.tokenizer(user_text(messages), add_special_tokens=False)["input_ids"]
        return Sample(
            id=record_id,
            task=str(record.get("task", "")),
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            prompt_ids=torch.tensor(prompt[: self.max_prompt_length], dtype=torch.long),
            image=media.get("image"),
            audio=media.get("audio"),
            reference=reference,
        )


def _validated_messages(record: dict, require_assistant: bool = True) -> list[dict]:
    """Checks the schema and returns messages with list-of-parts content."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    normalised = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ValueError(f"message {index} needs a role in {sorted(_ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError(f"message {index} content must be a string or a list of parts")
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", *MODALITIES):
                raise ValueError(f"message {index} has a part of unknown type: {part!r}")
        normalised.append({"role": message["role"], "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in normalised):
        raise ValueError("no assistant turn: nothing to supervise or to use as reference")
    return normalised


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
