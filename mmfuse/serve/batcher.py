"""Dynamic batching: concurrent requests are decoded together.

One worker thread owns the model. A job that comes while nothing is decoding starts at once.
Jobs that come while rows are decoding wait, and are prefilled together once
``prefill_group`` of them can be (that many wait and that many rows are free) or the oldest
has waited ``max_wait_ms``; they then join the rows in decoding between two steps (continuous
batching), and each row leaves, with its answer, as soon as it ends. A prefill has a large
fixed cost on a CPU (the encoders and the decoder over the prompts, op by op: 5.2 ms for one
image+audio prompt, 33 ms for 16 with the demo model), so new rows are worth gathering while
the batch is busy decoding: admitting them once they filled the free rows made prefills of
about 5 jobs behind the server. An idle batcher has nothing to gain from waiting, so it
starts a job at once (as TGI prefills into an empty batch). Every row has its own decoding
config and generator, so a seeded request gives the same answer alone or in company.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from mmfuse.generation import GenerationConfig, generate
from mmfuse.model import MMFuseModel
from mmfuse.modules.conditioning import PrefixConditioning
from mmfuse.processing.collate import Collator
from mmfuse.running_batch import RunningBatch
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
        arrived: when it was made (``time.monotonic``), for the batching wait.
    """

    sample: Sample
    config: GenerationConfig
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


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


def shared_prompts(jobs: Sequence[Job]) -> tuple[list[Sample], list[int]]:
    """The prompts to prefill for ``jobs`` and how many rows each becomes: neighbouring jobs
    that hold the very same sample (the ``n`` choices of one request) share one prefill."""
    samples: list[Sample] = []
    copies: list[int] = []
    for job in jobs:
        if samples and job.sample is samples[-1]:
            copies[-1] += 1
        else:
            samples.append(job.sample)
            copies.append(1)
    return samples, copies


class DynamicBatcher:
    """Runs generation jobs on a worker thread, in batches.

    Continuous batching (``RunningBatch``): between any two decoding steps, waiting jobs join
    the rows in decoding (up to ``max_batch_size``) and finished rows leave, so a short answer
    never waits for a long one. Models whose conditioning is cross-attention are decoded in
    static batches (``generate``): the batch ends with its longest row (each answer is still
    sent when its row ends).

    Args:
        model: the model (eval mode).
        collator: a left-padding collator for prompts.
        max_batch_size: most rows decoded together.
        max_wait_ms: how long a job may wait for company before it is prefilled with the
            others that came meanwhile. With continuous batching only jobs that come while
            rows are decoding wait; one that comes to an idle batcher starts at once.
        continuous: join and leave between steps (where the model allows it).
        prefill_group: with continuous batching, how many waiting jobs to prefill together
            while rows are decoding (fewer once the oldest has waited ``max_wait_ms``); None:
            half of ``max_batch_size``. Static batches start when they fill
            ``max_batch_size``.
    """

    def __init__(
        self,
        model: MMFuseModel,
        collator: Collator,
        max_batch_size: int = 8,
        max_wait_ms: float = 10,
        continuous: bool = True,
        prefill_group: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"batching.max_batch_size must be at least 1, got {max_batch_size}")
        if prefill_group is not None and not 1 <= prefill_group <= max_batch_size:
            raise ValueError(
                f"batching.prefill_group must be between 1 and max_batch_size={max_batch_size}, "
                f"got {prefill_group}"
            )
        self.prefill_group = prefill_group or max(1, max_batch_size // 2)
        self.model, self.collator = model, collator
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.continuous = continuous and isinstance(model.conditioning, PrefixConditioning)
        self.queue: queue.Queue[list[Job] | None] = queue.Queue()  # None: close()
        # rows decoded together after each admission (or static batch), for tests and benchmarks
        self.batch_sizes: list[int] = []
        self._eos = model.tokenizer.eos_token_id
        self._thread = threading.Thread(target=self._loop, name="mmfuse-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        return self.submit_all([job])[0]

    def submit_all(self, jobs: Sequence[Job]) -> list[Future]:
        """Submits jobs that are to start together (the ``n`` choices of one request): they
        are queued as one item, so the loop never takes some of them without the others."""
        self.queue.put(list(jobs))
        return [job.future for job in jobs]

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=30)

    def _row(self, job: Job) -> _RowText:
        tokenizer = self.model.tokenizer
        return _RowText(job, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))

    def _due(self, waiting: list[Job], free: int, decoding: bool) -> bool:
        """Whether to start the waiting jobs now. Continuous batching: at once when nothing
        is decoding; else once ``prefill_group`` of them can join the rows in decoding or the
        oldest has waited ``max_wait_ms`` (prefilling jobs together costs far less than one
        by one). Static batches: once they fill the batch or the oldest has waited."""
        if self.continuous and not decoding:
            return True
        if time.monotonic() - waiting[0].arrived >= self.max_wait:
            return True
        if not self.continuous:
            return len(waiting) >= free
        return min(len(waiting), free) >= self.prefill_group

    def _collect(self, waiting: list[Job], decoding: bool) -> bool:
        """Moves queued jobs to ``waiting``: with nothing in decoding, first sleeping until a
        job comes or, when some wait and are not due yet (static batches), until the oldest
        is due or more come; else only what is queued now. Returns whether ``close()`` was
        called (jobs after it are not taken)."""
        items: list[list[Job] | None] = []
        if not decoding and not waiting:
            items.append(self.queue.get())
        elif not decoding and not self._due(waiting, self.max_batch_size, decoding):
            timeout = waiting[0].arrived + self.max_wait - time.monotonic()
            try:
                items.append(self.queue.get(timeout=max(0.0, timeout)))
            except queue.Empty:
                pass
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is None:
                return True
            waiting.extend(item)
        return False

    def _loop(self) -> None:
        running, rows, waiting = RunningBatch(self.model), [], []
        stopping = False
        while rows or waiting or not stopping:
            if not stopping:
                stopping = self._collect(waiting, decoding=bool(rows))
            free = self.max_batch_size - len(rows)
            jobs: list[Job] = []
            if waiting and free > 0 and (stopping or self._due(waiting, free, bool(rows))):
                jobs, waiting = waiting[:free], waiting[free:]
            elif not rows:
                continue
            if not self.continuous:
                self._run_static(jobs)
                continue
            try:
                if jobs:  # they join the rows in decoding
                    samples, copies = shared_prompts(jobs)
                    batch = self.collator(samples)
                    batch = batch.to(next(self.model.parameters()).device)
                    new_rows = [self._row(j) for j in jobs]
                    first = running.join(batch, [j.config for j in jobs], copies)
                    rows += new_rows
                    self.batch_sizes.append(len(rows))
                    self._retire(running, rows, [None] * (len(rows) - len(first)) + first)
                if rows:
                    self._retire(running, rows, running.step())
            except Exception as err:  # the error goes to every row in decoding, not the thread
                for job in [*jobs, *(r.job for r in rows)]:
                    if not job.future.done():
                        job.future.set_exception(err)
                running, rows = RunningBatch(self.model), []

    def _take(self, row: _RowText, token: int) -> bool:
        """Adds a row's new token. When the row ends (end of turn, a stop string or its token
        limit) its answer is sent at once, not when its batch ends: returns True."""
        if token == self._eos:
            row.job.future.set_result(row.finish("stop"))
            return True
        row.add(token)
        if row.stopped or len(row.ids) >= row.job.config.max_new_tokens:
            row.job.future.set_result(row.finish("length"))
            return True
        return False

    def _retire(self, running: RunningBatch, rows: list[_RowText], tokens: list) -> None:
        """Adds each row's new token (None: none this time); rows that end leave the running
        batch."""
        ended = {
            i
            for i, (row, token) in enumerate(zip(rows, tokens, strict=True))
            if token is not None and self._take(row, token)
        }
        running.leave(sorted(ended))
        rows[:] = [row for i, row in enumerate(rows) if i not in ended]

    def _run_static(self, jobs: list[Job]) -> None:
        """Generates ``jobs`` as one static batch (``generate``)."""
        rows = [self._row(j) for j in jobs]

        def on_tokens(token: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
            for row, value in zip(rows, token.tolist(), strict=True):
                if not row.job.future.done():  # an ended row gets padding from here on
                    self._take(row, value)
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
            if not row.job.future.done():
                row.job.future.set_result(row.finish("length"))
