"""Hydra multirun with Lightning's DDP: every job's ranks work in that job's directory.

Lightning's DDP launcher starts ranks 1..N-1 by re-running the command line of rank 0 with
``hydra.run.dir`` set to rank 0's Hydra run directory (and ``hydra.output_subdir=null``, so
only rank 0 writes ``.hydra/``). In a multirun (``-m``) job that command line is the whole
sweep and the run directory is not the job's, so the children would start the sweep again.
:func:`multirun_ddp_job` makes the command line the job's own overrides and the run
directory the job's output directory (``<sweep dir>/<job number>``) while the job trains,
then, for the next job of the sweep in the same process, ends the job's process group and
removes the variables the launcher put in the environment (with ``LOCAL_RANK`` left set,
Lightning would take the next job's processes as launched externally and wait for ranks
that never come).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

# set in os.environ by lightning's _SubprocessScriptLauncher
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextlib.contextmanager
def multirun_ddp_job() -> Iterator[None]:
    """Inside a multirun job: DDP children re-run this job only, in its directory."""
    if not in_multirun():
        yield
        return
    hydra = HydraConfig.get()
    argv, run_dir = sys.argv, hydra.run.dir
    env = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
    sys.argv = [argv[0], *hydra.overrides.task]
    with read_write(hydra):
        hydra.run.dir = hydra.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra):
            hydra.run.dir = run_dir
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
