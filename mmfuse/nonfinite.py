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
    """Checks the loss and the gradients before the optimiser step, with one host read per
    step for both (as a gradient scaler does; nothing else in the step reads the device).

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
        self._loss: torch.Tensor | None = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ids = list(getattr(batch, "ids", None) or [])
        self._batch_idx = batch_idx

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss = loss.detach()  # checked with the gradients: one host read per step

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss, self._loss = self._loss, None
        loss_finite = torch.isfinite(loss).all() if loss is not None else torch.tensor(True)
        with_norm = not isinstance(trainer.strategy, DeepSpeedStrategy)
        norm = (
            _grad_norm(trainer, optimizer)
            if with_norm
            else loss_finite.new_zeros((), dtype=torch.float32)
        )
        # the one host read of the step: the loss check and the gradient norm together
        finite, norm_value = torch.stack(
            [loss_finite.float(), norm.float().to(loss_finite.device)]
        ).tolist()
        bad_loss = not finite
        if trainer.world_size > 1:
            bad_loss = trainer.strategy.reduce_boolean_decision(bad_loss, all=False)
        if bad_loss:
            self._found(
                trainer, "loss", loss.float().sum().item() if loss is not None else math.nan
            )
        if with_norm:
            if self.log_grad_norm:
                pl_module.log("train/grad_norm", norm_value, on_step=True, on_epoch=False)
            scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
            if not scaled and not self._skip_step and not math.isfinite(norm_value):
                self._found(trainer, "gradient norm", norm_value)
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


def _grad_norm(trainer: Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The 2-norm of all gradients the optimiser will apply (over the shards under FSDP), as a
    0-d tensor on their device (not read here)."""
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if not grads:
        return torch.zeros(())
    square = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True).float() ** 2
    if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
        square = trainer.strategy.reduce(square, reduce_op="sum")
    return square.sqrt()
