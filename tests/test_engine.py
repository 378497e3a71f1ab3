"""The engine process: the batcher in a child process answers exactly as on a thread."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
from helpers import world_prompt

from mmfuse.generation import GenerationConfig
from mmfuse.serve.batcher import Job
from mmfuse.serve.engine import EngineProcess, EngineSettings, _exit_code, build_batcher
from mmfuse.types import Sample


@pytest.fixture(scope="module")
def sample(trained_run: Path, world_dir: Path) -> Sample:
    return world_prompt(trained_run / "model", world_dir, "Describe the image.", audio=True)


@pytest.fixture(scope="module")
def settings(trained_run: Path) -> EngineSettings:
    return EngineSettings(ckpt=str(trained_run / "model"), threads=1, max_wait_ms=50)


CONFIGS = [
    GenerationConfig(max_new_tokens=12),
    GenerationConfig(max_new_tokens=12, do_sample=True, temperature=2.0, seed=5),
    GenerationConfig(max_new_tokens=3, do_sample=True, top_k=5, seed=1),
]


def _run(batcher, sample: Sample) -> list[tuple[object, str]]:
    """Submits one streamed job per config together (one message to the child);
    (completion, streamed text) each."""
    streamed: list[list[str]] = [[] for _ in CONFIGS]
    jobs = [
        Job(sample, config, on_text=pieces.append)
        for config, pieces in zip(CONFIGS, streamed, strict=True)
    ]
    batcher.submit_all(jobs)
    pairs = zip(jobs, streamed, strict=True)
    return [(job.future.result(timeout=60), "".join(pieces)) for job, pieces in pairs]


def test_child_answers_and_streams_what_the_thread_does(settings, sample):
    local, _ = build_batcher(settings)
    try:
        expected = _run(local, sample)
        assert local.batch_sizes == [3]  # prefilled together
    finally:
        local.close()
    engine = EngineProcess(settings)
    try:
        got = _run(engine, sample)
        plain = Job(sample, CONFIGS[0])  # not streamed: the completion alone
        assert engine.submit(plain).result(timeout=60) == expected[0][0]
    finally:
        engine.close()
    assert got == expected
    assert all(completion.text == text for completion, text in got)  # streamed whole
    assert expected[1][0].completion_tokens > 1
    assert not engine._process.is_alive()


def test_a_bad_model_directory_fails_at_start_with_its_reason(tmp_path: Path):
    with pytest.raises(RuntimeError, match="failed to start.*not a model directory"):
        EngineProcess(EngineSettings(ckpt=str(tmp_path)))


def test_jobs_fail_clearly_when_the_child_dies(settings, sample):
    engine = EngineProcess(settings)
    try:
        os.kill(engine._process.pid, signal.SIGKILL)
        engine._process.join(timeout=30)
        # whether or not the reader has seen the pipe close yet
        racing = Job(sample, GenerationConfig(max_new_tokens=2))
        with pytest.raises(RuntimeError, match="engine process ended"):
            engine.submit(racing).result(timeout=10)
        engine._reader.join(timeout=30)
        late = Job(sample, GenerationConfig(max_new_tokens=2))
        with pytest.raises(RuntimeError, match=r"engine process ended \(exit code -9\)"):
            engine.submit(late).result(timeout=10)
    finally:
        engine.close()


def test_the_exit_code_is_read_when_another_thread_reaped_the_child():
    child = multiprocessing.get_context("spawn").Process(target=sys.exit, args=(3,))
    child.start()
    # what a concurrent join (the test above, or close()) does: it reaps the child, and only
    # a moment later stores the code; meanwhile this thread's own waitpid finds no child
    os.waitpid(child.pid, 0)
    threading.Timer(0.05, setattr, (child._popen, "returncode", 3)).start()
    assert _exit_code(child) == 3
