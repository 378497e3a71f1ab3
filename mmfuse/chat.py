"""Chat entry point: ``mmfuse-chat ckpt=<model dir>`` (interactive) or with ``prompt=...``.

Interactive commands: ``/image PATH`` and ``/audio PATH`` attach media to the next message,
``/reset`` starts over, ``/quit`` leaves. Answers stream token by token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmfuse.config import CONFIG_DIR
from mmfuse.generation import GenerationConfig, generate
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import load_model_dir
from mmfuse.processing.collate import Collator
from mmfuse.processing.errors import RecordError
from mmfuse.processing.processor import Processor

HELP = "commands: /image PATH, /audio PATH, /reset, /quit; anything else is your message"


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
        """Forgets the conversation and any pending media."""
        self.messages: list[dict] = []
        if self.system:
            self.messages.append(
                {"role": "system", "content": [{"type": "text", "text": self.system}]}
            )
        self.pending: list[dict] = []

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
        if command == "/reset":
            session.reset()
            print("(conversation reset)", file=stdout)
        elif command in ("/image", "/audio"):
            session.attach(command[1:], argument.strip())
            print(f"({command[1:]} attached: {argument.strip()})", file=stdout)
        elif command.startswith("/"):
            print(f"unknown command {command}; {HELP}", file=stdout)
        else:
            _answer(session, line, stdout, stream)


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
    try:
        chat(cfg)
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
