"""Test-only callbacks that inject faults into a training run and record what it saw.

Added to a run from the command line, e.g.
``+callbacks.kill._target_=tests.faults.SignalAt +callbacks.kill.at_step=6``.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lightning.pytorch import Callback


class RecordIds(Callback):
    """Appends ``{"step", "epoch", "ids"}`` to a JSONL file after every training step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "ids": batch.ids}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


class SignalAt(Callback):
    """Sends ``signal`` to this process when the batch after ``at_step`` steps starts."""

    def __init__(self, at_step: int, signal: str = "SIGKILL") -> None:
        self.at_step = at_step
        self.signal = signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class InjectNaN(Callback):
    """At the given steps, makes the model's logits NaN (``where=loss``) or one gradient
    entry NaN after backward (``where=grad``)."""

    def __init__(self, steps: list[int], where: str = "loss") -> None:
        self.steps = set(steps)
        self.where = where
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "loss" and trainer.global_step in self.steps:
            self._hook = pl_module.model.register_forward_hook(
                lambda module, inputs, out: (out[0] * float("nan"), out[1])
            )

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.where == "grad" and trainer.global_step in self.steps:
            param = next(p for p in pl_module.parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("nan")


class ParamTrace(Callback):
    """Appends the sum of all parameters before and after every step to a JSONL file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._before = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = _param_sum(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {"step": trainer.global_step, "before": self._before, "after": _param_sum(pl_module)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def _param_sum(module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))
