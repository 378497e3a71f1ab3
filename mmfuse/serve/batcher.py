"""Dynamic batching: requests that arrive close together are generated as one batch.

One worker thread owns the model. It takes the first waiting job, then gathers more until the
batch is full or ``max_wait_ms`` has passed, and decodes them together with one decoding
config per row (so a seeded request gives the same answer alone or in company).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from mmfuse.generation import GenerationConfig, generate
from mmfuse.model import MMFuseModel
from mmfuse.processing.collate import Collator
from mmfuse.types import Sample


@dataclass
class Completion:
    """One finished choice: its text, generated token count and why it ended."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


@dataclass
class Job:
    """One choice to generate.

    Attributes:
        sample: the processed prompt.
        config: its decoding settings.
        stop: strings that end it; the text is cut before the first one.
        on_text: receives new text as it is produced (from the worker thread).
        future: resolves to a ``Completion`` (or to the error that stopped the batch).
    """

    sample: Sample
    config: GenerationConfig
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)


class _RowText:
    """Tracks one row's tokens, its text up to any stop string, and what was streamed."""

    def __init__(self, job: Job, decode: Callable[[list[int]], str]) -> None:
        self.job, self.decode = job, decode
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        cuts = [text.find(s) for s in self.job.stop if s in text]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        self._send(final=self.stopped)

    def _send(self, final: bool) -> None:
        """Streams the text that can no longer change: not a half-decoded character, nor
        the start of a stop string."""
        safe = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                safe -= 1
            for stop in self.job.stop:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        if safe > self.sent and self.job.on_text is not None:
            self.job.on_text(self.text[self.sent : safe])
            self.sent = safe

    def finish(self, reason: str) -> Completion:
        self._send(final=True)
        return Completion(self.text, len(self.ids), "stop" if self.stopped else reason)


class DynamicBatcher:
    """Runs generation jobs on a worker thread, in batches.

    Args:
        model: the model (eval mode).
        collator: a left-padding collator for prompts.
        max_batch_size: most rows generated together.
        max_wait_ms: how long the first job of a batch waits for company.
    """

    def __init__(
        self,
        model: MMFuseModel,
        collator: Collator,
        max_batch_size: int = 8,
        max_wait_ms: float = 10,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"batching.max_batch_size must be at least 1, got {max_batch_size}")
        self.model, self.collator = model, collator
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batch_sizes: list[int] = []  # rows of every batch run, for tests and benchmarks
        self._thread = threading.Thread(target=self._loop, name="mmfuse-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, deadline = [first], time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch_size:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        tokenizer = self.model.tokenizer
        rows = [
            _RowText(j, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) for j in jobs
        ]
        eos = tokenizer.eos_token_id

        def finish(row: _RowText, ended: bool) -> None:
            """Resolves a row's future as soon as it ends, not when its whole batch does: its
            client gets the answer (and may send the next request) while longer rows run on."""
            if not row.job.future.done():
                hit_limit = not ended and len(row.ids) >= row.job.config.max_new_tokens
                row.job.future.set_result(row.finish("length" if hit_limit else "stop"))

        def on_tokens(token: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
            for row, value, ended in zip(rows, token.tolist(), finished.tolist(), strict=True):
                if row.job.future.done():
                    continue
                if value != eos:
                    row.add(value)
                if ended or row.stopped or len(row.ids) >= row.job.config.max_new_tokens:
                    finish(row, ended)
            return torch.tensor([row.stopped for row in rows], device=finished.device)

        try:
            device = next(self.model.parameters()).device
            batch = self.collator([j.sample for j in jobs]).to(device)
            self.batch_sizes.append(len(jobs))
            generate(self.model, batch, [j.config for j in jobs], on_tokens=on_tokens)
        except Exception as err:  # the error goes to every waiting request, not to the thread
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        for row in rows:  # rows that never got a token (max_tokens of 0)
            finish(row, False)
