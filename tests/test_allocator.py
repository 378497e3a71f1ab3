"""mmfuse.allocator: glibc keeps freed tensor memory for the next call."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from mmfuse import allocator

# Runs in a fresh interpreter (malloc settings belong to a process): allocates and frees an
# 8 MiB tensor and reports glibc's counters (mallinfo2) while it lives and after it is freed.
PROBE = """
import ctypes, json, sys
from mmfuse.allocator import keep_freed_memory
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in names]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
took = keep_freed_memory() if sys.argv[1] == "keep" else None
import torch
block = torch.ones(8 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd
del block
print(json.dumps({"took": took, "mapped": mapped, "free_in_heap": libc.mallinfo2().fordblks}))
"""


def _probe(setting: str, env: dict | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, setting], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc 2.33+ (mallinfo2) only",
)


@glibc_only
def test_freed_blocks_stay_in_the_heap() -> None:
    default, kept = _probe("default"), _probe("keep")
    # glibc's defaults: the 8 MiB block is mapped on its own and unmapped when freed
    assert default["mapped"] >= 8 << 20
    assert default["free_in_heap"] < 8 << 20
    # kept: it comes from the heap and stays there, free, for the next call
    assert kept["took"] is True
    assert kept["mapped"] < 8 << 20
    assert kept["free_in_heap"] >= 8 << 20


@glibc_only
def test_settings_in_the_environment_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False
    assert _probe("keep", dict(os.environ))["took"] is False


def test_other_systems_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
