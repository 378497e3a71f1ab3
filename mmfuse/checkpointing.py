"""Checkpoints for exact resume: atomic files, ``last.ckpt`` kept current, and RNG states.

What a checkpoint holds and who puts it there (all of it loads with
``torch.load(weights_only=True)``):

- model, optimiser and schedule state, loop progress: Lightning;
- the training loader's position (epoch and samples handed out): Lightning saves the
  ``state_dict()`` of a stateful loader, ``data_modules.sampler.ResumableDataLoader``;
- the torch, CUDA, numpy and Python RNG states of every rank: :class:`ResumeState` (which
  also sees that the loader position is loaded);
- the module's hyper-parameters: plain numbers, strings, lists and dicts.

:class:`AtomicCheckpointIO` (a trainer plugin, ``conf/trainer/cpu.yaml``) writes every
single-file checkpoint to a temporary file in the same directory, fsyncs it and renames it
over the target (``os.replace``), so a crash half-way through a write leaves the previous
``last.ckpt`` as it was. :class:`LastCheckpoint` keeps ``last.ckpt`` current: every N
training steps, when training ends, and on SIGTERM (preemption).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: temporary file, fsync, rename.

    (Lightning's own save goes through an fsspec transaction whose temporary file lives in
    the system temporary directory, which is a copy, not a rename, when that is another file
    system, and is never fsynced.) Remote paths use Lightning's save.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local paths")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
        try:
            with tmp.open("wb") as handle:
                self._dump(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)

    @staticmethod
    def _dump(checkpoint: dict[str, Any], handle: IO[bytes]) -> None:
        torch.save(checkpoint, handle)


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Deletes temporary files that a killed write left in ``directory``; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and p.name.startswith(TMP_PREFIX)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` the full training state, for resuming.

    It is written every ``every_n_train_steps`` steps (Lightning's own trigger), when
    training ends, and, with ``save_on_sigterm``, at the end of the step during which the
    process got SIGTERM. Lightning's signal connector records SIGTERM (on any cluster, SLURM
    or not; on rank 0 it also forwards the signal to the ranks it launched) and raises
    ``SIGTERMException`` once that step is over; ``mmfuse.train.train`` turns that into a
    clean exit. With several ranks, whether any rank got the signal is agreed on by an
    all-reduce each step, so every rank saves and stops at the same step.

    The checkpoint is written at the end of a training step, where Lightning's periodic
    checkpoints are written: resuming from it repeats and skips nothing. (Lightning's
    ``save_on_exception`` would also save after any error, mid-step; it stays off.)

    Best-model checkpoints by a validation metric are a separate ``ModelCheckpoint``
    (``conf/callbacks/model_checkpoint.yaml``).

    Args:
        dirpath: checkpoint directory.
        every_n_train_steps: save every N optimiser steps (None or 0: only at the end and on
            SIGTERM).
        save_on_sigterm: save when SIGTERM arrives.
        **kwargs: other ``ModelCheckpoint`` arguments (``filename``, ``verbose``, ...);
            ``enable_version_counter`` defaults to False (always ``last.ckpt``).
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        every_n_train_steps: int | None = None,
        save_on_sigterm: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps or None,
            **kwargs,
        )
        self.save_on_sigterm = save_on_sigterm

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None:
            for path in remove_stale_temporaries(self.dirpath):
                log.warning("removed %s, left by a checkpoint write that did not finish", path)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.save_on_sigterm or not _sigterm_on_any_rank(trainer):
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(
            f"SIGTERM: saved {self.last_model_path} at step {trainer.global_step}; stopping"
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _sigterm_on_any_rank(trainer: Trainer) -> bool:
    """Whether any rank got SIGTERM; every rank then marks it, so all stop at this step."""
    received = trainer.received_sigterm
    if trainer.world_size > 1:
        received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if received:
            trainer._signal_connector.received_sigterm = True
    return received


class ResumeState(Callback):
    """Saves the torch, CUDA, numpy and Python RNG states of every rank in the checkpoint
    and restores them when training starts from it, so dropout and any other random draw
    continue as if the run had not stopped; and makes sure the training loader's saved
    position is loaded.

    (Lightning loads a stateful loader's state when it sets the training data up, but only
    if the checkpoint has been read by then. ``configure_optimizers`` asks for
    ``trainer.estimated_stepping_batches`` to size the schedule, which sets the training data
    up before the checkpoint is read, and the position would be dropped. The loaders are
    set up then but not yet iterated, so the states are loaded at train start instead, with
    the fit loop's own ``_load_combined_loader_states``.)

    States are stored as tensors, ints and lists (numpy's key array becomes a tensor), so the
    checkpoint loads with ``weights_only=True``. With several ranks the states are gathered
    to every rank (``all_gather_object``; checkpoints are written by all ranks together) and
    each rank restores its own; a checkpoint from a different number of ranks restores rank
    0's states everywhere, with a warning.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = collect_rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # restored here, after the loaders and optimisers are set up: what runs next is the
        # first training step after the one the checkpoint was written at
        if trainer.fit_loop._combined_loader_states_to_load:
            trainer.fit_loop._load_combined_loader_states()
        if self._to_restore is None:
            return
        ranks = self._to_restore["ranks"]
        self._to_restore = None
        if len(ranks) != trainer.world_size:
            log.warning(
                "the checkpoint holds RNG states of %d ranks, this run has %d: every rank "
                "restores rank 0's",
                len(ranks),
                trainer.world_size,
            )
        rank = trainer.global_rank if len(ranks) == trainer.world_size else 0
        set_rng_states(ranks[rank])


def collect_rng_states() -> dict[str, Any]:
    """This process's RNG states as tensors, ints and lists (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores states from :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
