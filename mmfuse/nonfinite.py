"""Stop, or skip and count, on a non-finite loss or gradient; log the gradient norm every step.

Configured as a callback (``conf/callbacks/nonfinite.yaml``, in ``callbacks: default``), not
under ``trainer:``: the trainer group is the keyword arguments of ``lightning.Trainer``, which
has no such option, and each callback config is the arguments of one object::

    mmfuse-train callbacks.nonfinite.action=skip callbacks.nonfinite.max_skipped=20
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

ACTIONS = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient (the message names the step and the records)."""


class NonFiniteGuard(Callback):
    """Checks the loss before backward and the gradients before the optimiser step.

    ``stop``: raises :class:`NonFiniteError` naming the step (optimiser steps done before
    this batch), the batch index and the record ids of the batch (of all ranks).
    ``skip``: drops that step's gradients (the optimiser then changes nothing; the schedule
    still advances), counts it (``train/skipped_steps``, kept in checkpoints) and raises
    once more than ``max_skipped`` steps were skipped.

    The total gradient norm (before clipping) is logged every step as ``train/grad_norm``.
    With several ranks the loss check is agreed on by an all-reduce, and the gradients are
    already averaged over ranks, so every rank decides the same. Under FSDP the norm is
    all-reduced from the shards. Under DeepSpeed the gradients live in the engine, so only
    the loss is checked and no norm is logged. Under fp16 (``16-mixed``) the gradient scaler
    already skips steps with infinite gradients; only the loss is checked.

    Args:
        action: ``stop`` or ``skip``.
        max_skipped: with ``skip``, the number of skipped steps allowed in a run.
        log_grad_norm: log ``train/grad_norm`` every step.
    """

    def __init__(self, action: str = "stop", max_skipped: int = 10, log_grad_norm: bool = True):
        if action not in ACTIONS:
            raise ValueError(f"callbacks.nonfinite.action must be one of {ACTIONS}, got {action!r}")
        if max_skipped < 0:
            raise ValueError(f"callbacks.nonfinite.max_skipped must be >= 0, got {max_skipped}")
        self.action = action
        self.max_skipped = max_skipped
        self.log_grad_norm = log_grad_norm
        self.skipped = 0
        self._ids: list[str] = []
        self._batch_idx = 0
        self._skip_step = False

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ids = list(getattr(batch, "ids", None) or [])
        self._batch_idx = batch_idx

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self._found(trainer, "loss", loss.detach().float().sum().item())

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not isinstance(trainer.strategy, DeepSpeedStrategy):
            norm = _grad_norm(trainer, optimizer)
            if self.log_grad_norm:
                pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
            if not scaled and not self._skip_step and not math.isfinite(norm):
                self._found(trainer, "gradient norm", norm)
        if self._skip_step:
            optimizer.zero_grad(set_to_none=True)
            self._skip_step = False
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def _found(self, trainer: Trainer, what: str, value: float) -> None:
        where = (
            f"non-finite {what} ({value}) at step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}, batch {self._batch_idx}); records: {self._all_ids(trainer)}"
        )
        if self.action == "stop":
            raise NonFiniteError(
                f"{where}. Set callbacks.nonfinite.action=skip to skip such steps."
            )
        self.skipped += 1
        self._skip_step = True
        if self.skipped > self.max_skipped:
            raise NonFiniteError(
                f"{where}: {self.skipped} steps skipped, more than "
                f"callbacks.nonfinite.max_skipped={self.max_skipped}"
            )
        rank_zero_warn(f"{where}: step skipped ({self.skipped}/{self.max_skipped})")

    def _all_ids(self, trainer: Trainer) -> list[str]:
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return self._ids
        gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
        torch.distributed.all_gather_object(gathered, self._ids)
        return [record for ids in gathered for record in ids]

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _grad_norm(trainer: Trainer, optimizer: torch.optim.Optimizer) -> float:
    """The 2-norm of all gradients the optimiser will apply (over the shards under FSDP)."""
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if not grads:
        return 0.0
    square = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True).float() ** 2
    if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
        square = trainer.strategy.reduce(square, reduce_op="sum")
    return float(square.sqrt())
