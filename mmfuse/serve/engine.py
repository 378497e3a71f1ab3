"""The model in its own process: the HTTP server and generation do not share one GIL.

In one process, the event loop (HTTP, JSON, server-sent events) and the batcher's Python
between torch operations take turns on the interpreter lock, so a busy server runs little
faster than one core however many it has. ``EngineProcess`` runs the ``DynamicBatcher`` in
a child process instead (``batching.separate_process``; as vLLM runs its engine core apart
from its API server): the parent processes requests and streams answers, the child only
generates. It is the default: on 2 CPU cores the load test serves 189 requests/s this way,
115 with the model on a thread (docs/serving_performance.md). It has the batcher's interface
(``submit``, ``submit_all``, ``close``), so the app cannot tell them apart.

Jobs go to the child and events come back over one pipe, as pickles (``send_bytes``: no
shared-memory handles for the small prompt tensors) that carry CPU tensors as numpy arrays:
torch's own pickling of a tensor costs ten times as much to load. The child sends each job's
new text as it comes, then its ``Completion`` or the error that stopped it; events that pile
up while one message is sent go together in the next.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import pickle
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from mmfuse.allocator import keep_freed_memory
from mmfuse.processing.processor import Processor
from mmfuse.serve.batcher import DynamicBatcher, Job

_READY, _TEXT, _DONE, _ERROR, _FAILED = "ready", "text", "done", "error", "failed"


@dataclass
class EngineSettings:
    """What the child needs to build its batcher (``conf/serve.yaml``: ckpt, device, threads,
    batching)."""

    ckpt: str
    device: str = "cpu"
    threads: int | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 10
    continuous: bool = True
    prefill_group: int | None = None


def build_batcher(settings: EngineSettings) -> tuple[DynamicBatcher, Processor]:
    """Loads the model directory and starts a ``DynamicBatcher`` on it (in this process);
    returns it with the directory's processor."""
    from mmfuse.model_dir import load_model_dir
    from mmfuse.processing.collate import Collator

    keep_freed_memory()  # in the process that runs the model: the child, or the server
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, processor = load_model_dir(settings.ckpt, settings.device)
    collator = Collator(processor.tokenizer.pad_token_id, "left", processor.image.size)
    batcher = DynamicBatcher(
        model,
        collator,
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.continuous,
        settings.prefill_group,
    )
    return batcher, processor


class EngineProcess:
    """A ``DynamicBatcher`` in a child process, behind the batcher's interface.

    Args:
        settings: the model directory and batching settings.
        start_timeout_s: how long the child may take to load the model.

    Raises:
        RuntimeError: the child could not load the model (its message) or did not start.
    """

    def __init__(self, settings: EngineSettings, start_timeout_s: float = 300) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_child_main, args=(child_conn, settings), name="mmfuse-engine", daemon=True
        )
        self._process.start()
        child_conn.close()
        if not self._conn.poll(start_timeout_s):
            self._process.kill()
            raise RuntimeError(f"the engine process did not start in {start_timeout_s:.0f} s")
        try:
            kind, message = _receive(self._conn)
        except EOFError:  # it died before it could say why
            self._process.join(timeout=10)
            kind, message = _FAILED, f"it exited with code {self._process.exitcode}"
        if kind != _READY:
            self._process.join(timeout=10)
            raise RuntimeError(f"the engine process failed to start: {message}")
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._ended: str | None = None
        self._reader = threading.Thread(target=self._read, name="mmfuse-engine-reader", daemon=True)
        self._reader.start()

    def submit(self, job: Job) -> Future:
        return self.submit_all([job])[0]

    def submit_all(self, jobs: Sequence[Job]) -> list[Future]:
        """Sends jobs that are to start together (``DynamicBatcher.submit_all``) in one
        message (a shared prompt is pickled once)."""
        futures = [job.future for job in jobs]
        with self._lock:
            if self._ended is not None:
                for job in jobs:
                    job.future.set_exception(RuntimeError(self._ended))
                return futures
            idents = [next(self._ids) for _ in jobs]
            message = [
                (ident, job.sample, job.config, job.stop, job.on_text is not None)
                for ident, job in zip(idents, jobs, strict=True)
            ]
            try:
                self._conn.send_bytes(_dumps(message))
            except OSError:  # the child is gone; the reader has not noticed yet
                for job in jobs:
                    job.future.set_exception(RuntimeError("the engine process ended"))
                return futures
            self._jobs.update(zip(idents, jobs, strict=True))
        return futures

    def close(self) -> None:
        """Stops the child after the jobs it has; waits for it."""
        with self._lock, contextlib.suppress(OSError):  # OSError: the child is gone already
            if self._ended is None:
                self._conn.send_bytes(_dumps(None))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._reader.join(timeout=10)

    def _read(self) -> None:
        """Hands the child's events to the jobs; when the child ends, fails what is left."""
        try:
            while True:
                for kind, ident, value in _receive(self._conn):
                    with self._lock:
                        job = self._jobs[ident] if kind == _TEXT else self._jobs.pop(ident)
                    if kind == _TEXT:
                        job.on_text(value)
                    elif kind == _DONE:
                        job.future.set_result(value)
                    else:
                        job.future.set_exception(RuntimeError(value))
        except (EOFError, OSError):
            pass
        code = _exit_code(self._process)  # its pipe is closed: it is ending
        with self._lock:
            self._ended = f"the engine process ended (exit code {code})"
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.future.set_exception(RuntimeError(self._ended))


def _exit_code(process: multiprocessing.process.BaseProcess, timeout: float = 5) -> int | None:
    """The exit code of a child that is ending. Another thread joining it at the same time
    (``close``) may reap it first: this thread's ``waitpid`` then fails, and the code reads
    None until the other thread has stored it, a moment later."""
    deadline = time.monotonic() + timeout
    process.join(timeout)
    while process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return process.exitcode


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool}


class _NumpyTensorPickler(pickle.Pickler):
    """Pickles CPU tensors as numpy arrays (raw buffers; loaded back with ``torch.from_numpy``)."""

    def reducer_override(self, obj):
        if (
            isinstance(obj, torch.Tensor)
            and obj.device.type == "cpu"
            and obj.dtype in _NUMPY_DTYPES
            and not obj.requires_grad
        ):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def _dumps(message) -> bytes:
    buffer = io.BytesIO()
    _NumpyTensorPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


def _receive(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def _child_main(conn: Connection, settings: EngineSettings) -> None:
    """The child: builds the batcher, then turns messages into jobs until ``None`` comes.

    Events go back through a sender thread that sends whatever has piled up as one message
    (the new text of every row of a decoding step, say): one pipe write and one wake-up of
    the parent's reader per batch of events, not per token.
    """

    def send(message) -> None:
        conn.send_bytes(_dumps(message))

    try:
        batcher, _ = build_batcher(settings)
    except Exception as err:  # the parent raises it with the message
        send((_FAILED, f"{type(err).__name__}: {err} (model directory {Path(settings.ckpt)})"))
        return
    send((_READY, None))
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_send_events, args=(outbox, send), daemon=True)
    sender.start()

    def finished(ident: int, future: Future) -> None:
        error = future.exception()
        if error is None:
            outbox.put((_DONE, ident, future.result()))
        else:
            outbox.put((_ERROR, ident, f"generation failed ({type(error).__name__}: {error})"))

    while True:
        try:
            message = _receive(conn)
        except (EOFError, OSError):  # the parent is gone
            break
        if message is None:
            break
        jobs = []
        for ident, sample, config, stop, streamed in message:
            on_text = (lambda text, i=ident: outbox.put((_TEXT, i, text))) if streamed else None
            job = Job(sample, config, stop, on_text)
            job.future.add_done_callback(lambda future, i=ident: finished(i, future))
            jobs.append(job)
        batcher.submit_all(jobs)
    batcher.close()
    outbox.put(None)
    sender.join(timeout=10)


def _send_events(outbox: queue.SimpleQueue, send: Callable[[list], None]) -> None:
    """Sends the queued events in lists, each holding all that was queued; stops at None."""
    while True:
        events = [outbox.get()]
        while not outbox.empty():
            events.append(outbox.get())
        done = None in events
        events = [event for event in events if event is not None]
        if events:
            try:
                send(events)
            except OSError:  # the parent is gone
                return
        if done:
            return
