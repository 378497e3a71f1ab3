"""Chat entry point: ``mmfuse-chat ckpt=<model dir>`` (interactive) or with ``prompt=...``.

Interactive commands: ``/image PATH`` and ``/audio PATH`` attach media to the next message;
``/system TEXT`` sets the system message and keeps the conversation (``/system`` alone
removes it); ``/save FILE`` appends the conversation to ``FILE`` as one conversation-schema
JSONL record (task ``chat``, media paths relative to ``FILE``'s directory, media files left
where they are), so transcripts are training data for ``data=jsonl``; ``/load FILE``
continues the last conversation saved in ``FILE``; ``/reset`` starts over (keeping the
system message); ``/help`` lists the commands; ``/quit`` leaves. Answers stream token by
token. A command that fails says why and the session goes on.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmfuse.allocator import keep_freed_memory
from mmfuse.config import CONFIG_DIR
from mmfuse.generation import GenerationConfig, generate
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import load_model_dir
from mmfuse.processing.collate import Collator
from mmfuse.processing.errors import RecordError
from mmfuse.processing.processor import Processor
from mmfuse.processing.text import message_text
from mmfuse.types import MODALITIES

HELP = """commands:
  /image PATH   attach an image to your next message (/audio PATH: a sound clip)
  /system TEXT  set the system message, keeping the conversation (/system alone removes it)
  /save FILE    append this conversation to FILE as one JSONL record (training data)
  /load FILE    continue the last conversation saved in FILE (replaces this one)
  /reset        start over (the system message stays)
  /help         this list
  /quit         leave
anything else is your message"""
TASK = "chat"


class ChatSession:
    """A multi-turn conversation with a loaded model.

    Args:
        model: the model (eval mode).
        processor: its processor.
        generation: decoding settings.
        system: optional system message.
    """

    def __init__(
        self,
        model: MMFuseModel,
        processor: Processor,
        generation: GenerationConfig,
        system: str | None = None,
    ) -> None:
        self.model, self.processor, self.generation = model, processor, generation
        self.system = system
        self.collate = Collator(processor.tokenizer.pad_token_id, "left", processor.image.size)
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation and any pending media (the system message stays)."""
        self.messages: list[dict] = []
        if self.system:
            self.messages.append(_system_message(self.system))
        self.pending: list[dict] = []

    def set_system(self, text: str | None) -> None:
        """Sets (or, with no text, removes) the system message; the conversation is kept."""
        self.system = text or None
        if self.messages and self.messages[0]["role"] == "system":
            self.messages = self.messages[1:]
        if self.system:
            self.messages = [_system_message(self.system), *self.messages]

    def save(self, path: str | Path) -> dict:
        """Appends the conversation to the JSONL file ``path`` as one record and returns it.

        Media paths are written relative to the file's directory (the schema's rule); the
        media files themselves are neither copied nor changed.

        Raises:
            ValueError: the conversation has no answer yet (it would not be training data).
            OSError: the file cannot be written.
        """
        if not any(m["role"] == "assistant" for m in self.messages):
            raise ValueError("nothing to save yet: the conversation has no answer")
        path = Path(path).expanduser()
        # physical paths: `..` in the written path must lead to the file through symlinks too
        base = os.path.realpath(path.parent)
        messages = [
            _map_media_paths(m, lambda p: os.path.relpath(os.path.realpath(p), base))
            for m in self.messages
        ]
        record = {"id": f"chat-{uuid.uuid4().hex[:12]}", "task": TASK, "messages": messages}
        path.parent.mkdir(parents=True, exist_ok=True)
        # a file whose last line lacks its newline would glue this record onto it
        separator = "\n" if path.is_file() and not _ends_with_newline(path) else ""
        with path.open("a", encoding="utf-8") as handle:
            handle.write(separator + json.dumps(record, ensure_ascii=False) + "\n")
        return record

    def load(self, path: str | Path) -> tuple[int, dict]:
        """Replaces the conversation with the last record of the JSONL file ``path``.

        Media paths in the record are relative to the file's directory. The record is
        checked as training data is (schema, media files, length); pending media are dropped
        and the record's system message, if any, becomes the session's.

        Returns:
            (line number, record).

        Raises:
            ValueError: naming the file and line (bad JSON, not a conversation record).
            OSError: the file cannot be read.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a UTF-8 text file: {err}") from err
        number = next((i for i in range(len(lines), 0, -1) if lines[i - 1].strip()), 0)
        if not number:
            raise ValueError(f"{path}: no record (the file is empty)")
        where = f"{path}:{number}"
        try:
            record = json.loads(lines[number - 1])
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a record must be a JSON object")
        base = os.path.realpath(path.parent)
        try:
            # RecordError if unusable; the model may have answered nothing in a saved chat
            self.processor(record, base_dir=base, source=where, empty_reply_ok=True)
            messages = [
                _map_media_paths(_with_parts(m), lambda p: os.path.realpath(os.path.join(base, p)))
                for m in record["messages"]
            ]
        except (TypeError, KeyError, AttributeError) as err:  # e.g. a path that is no string
            raise ValueError(f"{where}: not a conversation record: {err!r}") from err
        first = messages[0]
        self.system = message_text(first) if first["role"] == "system" else None
        self.messages, self.pending = messages, []
        return number, record

    def attach(self, kind: str, path: str) -> None:
        """Queues an image or audio file for the next user message."""
        self.pending.append({"type": kind, "path": path})

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Sends a user message and returns the answer; ``on_text`` receives streamed pieces.

        The conversation is left unchanged if the message cannot be processed.
        """
        content = [*self.pending, {"type": "text", "text": text}]
        messages = [*self.messages, {"role": "user", "content": content}]
        sample = self.processor.prompt(messages)
        batch = self.collate([sample]).to(next(self.model.parameters()).device)
        tokenizer = self.processor.tokenizer
        generated: list[int] = []
        shown = ""

        def stream(token: torch.Tensor, finished: torch.Tensor) -> None:
            nonlocal shown
            if finished[0]:
                return
            generated.append(int(token[0]))
            text_so_far = tokenizer.decode(generated, skip_special_tokens=True)
            if on_text is not None and not text_so_far.endswith("\ufffd"):
                on_text(text_so_far[len(shown) :])
                shown = text_so_far

        tokens = generate(self.model, batch, self.generation, on_tokens=stream)[0]
        answer = tokenizer.decode(tokens, skip_special_tokens=True)
        if on_text is not None and len(answer) > len(shown):
            on_text(answer[len(shown) :])
        self.messages = [
            *messages,
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        self.pending = []
        return answer


def run_interactive(session: ChatSession, stdin: TextIO, stdout: TextIO, stream: bool) -> None:
    """Reads messages and commands from ``stdin`` until EOF or ``/quit``."""
    print(HELP, file=stdout)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command == "/quit":
            break
        argument = argument.strip()
        if command == "/help":
            print(HELP, file=stdout)
        elif command == "/reset":
            session.reset()
            print("(conversation reset)", file=stdout)
        elif command == "/system":
            session.set_system(argument)
            done = "set" if argument else "removed"
            print(f"(system message {done}; the conversation so far is kept)", file=stdout)
        elif command in ("/save", "/load"):
            _transcript(session, command, argument, stdout)
        elif command in ("/image", "/audio") and not argument:
            print(f"usage: {command} PATH", file=stdout)
        elif command in ("/image", "/audio"):
            session.attach(command[1:], argument)
            print(f"({command[1:]} attached: {argument})", file=stdout)
        elif command.startswith("/"):
            print(f"unknown command {command}; /help lists the commands", file=stdout)
        else:
            _answer(session, line, stdout, stream)


def _transcript(session: ChatSession, command: str, path: str, stdout: TextIO) -> None:
    """``/save FILE`` or ``/load FILE``; a failure is reported and the session goes on."""
    if not path:
        print(f"usage: {command} FILE", file=stdout)
        return
    try:
        if command == "/save":
            record = session.save(path)
            print(f"(conversation saved to {path} as record {record['id']})", file=stdout)
            if session.pending:
                print("(media attached for the next message are not saved)", file=stdout)
        else:
            number, record = session.load(path)
            turns = sum(m["role"] == "assistant" for m in session.messages)
            print(
                f"(loaded record {record.get('id', '<no id>')!r} from {path}:{number}: "
                f"{turns} answer(s); continue the conversation)",
                file=stdout,
            )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=stdout)


def _system_message(text: str) -> dict:
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def _with_parts(message: dict) -> dict:
    """The message with its content as a list of parts (the schema allows a plain string)."""
    content = message["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return {"role": message["role"], "content": [dict(part) for part in content]}


def _map_media_paths(message: dict, change: Callable[[str], str]) -> dict:
    """A copy of ``message`` whose media parts' paths are ``change(path)``."""
    content = [
        {**part, "path": change(part["path"])} if part.get("type") in MODALITIES else {**part}
        for part in message["content"]
    ]
    return {"role": message["role"], "content": content}


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _answer(session: ChatSession, text: str, stdout: TextIO, stream: bool) -> None:
    stdout.write("mmfuse> ")
    try:
        answer = session.ask(
            text, (lambda piece: (stdout.write(piece), stdout.flush())) if stream else None
        )
    except RecordError as err:
        print(f"\nerror: {err}", file=stdout)
        session.pending = []
        return
    if not stream:
        stdout.write(answer)
    stdout.write("\n")


def chat(cfg: DictConfig, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> str | None:
    """Runs one-shot (``prompt`` set: returns the answer) or interactive chat."""
    model, processor = load_model_dir(cfg.ckpt, cfg.device)
    session = ChatSession(model, processor, instantiate(cfg.generation), cfg.system)
    if cfg.prompt is None:
        run_interactive(session, stdin, stdout, cfg.stream)
        return None
    if cfg.image:
        session.attach("image", cfg.image)
    if cfg.audio:
        session.attach("audio", cfg.audio)
    answer = session.ask(cfg.prompt)
    print(answer, file=stdout)
    return answer


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="chat")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper around :func:`chat`."""
    keep_freed_memory()
    try:
        chat(cfg)
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
