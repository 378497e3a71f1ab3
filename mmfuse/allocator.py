"""glibc ``malloc`` settings for tensor work on CPU: freed memory is kept for the next call.

glibc hands large blocks (above a threshold that grows to at most 32 MiB as blocks are freed)
straight from ``mmap`` and gives them back to the kernel on ``free``; it also returns the top
of its heap to the kernel once more than the trim threshold is free there. A model on the
CPU allocates and frees activation-sized tensors on every call, so each call faults in, and
the kernel zeroes, the same pages again. On the demo model, the wav2vec2 feature encoder on
16 one-second clips took 20.7 ms that way and 7.3 ms with freed memory kept, a training step
202 and 181 ms (``benchmarks/allocator.py``, 2 threads). jemalloc and tcmalloc, which
PyTorch's CPU guides recommend, keep freed memory too; these settings get most of that from
the C library already loaded.

:func:`keep_freed_memory` is called at the start of every ``mmfuse-*`` command that runs a
model. Setting ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` in the environment
(glibc's own tunables) leaves the choice to you.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # the most glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap, at most


def keep_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Makes glibc serve blocks below ``mmap_threshold`` bytes from its heap and keep up to
    ``trim_threshold`` bytes of freed heap memory. Returns whether the settings took effect:
    False on other C libraries and systems, or when the environment already sets them."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl has a mallopt that ignores)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
