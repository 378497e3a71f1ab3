"""``run_summary.json``: what a run cost, for ``mmfuse-compare``.

The callback (``callbacks=[default,run_summary]``) writes, when training ends, the seconds
the fit took (validation included), the steps taken and the parameter table (total and
trainable per component, after freezing and LoRA) to ``<dirpath>/run_summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from mmfuse.freezing import parameter_table

SUMMARY = "run_summary.json"


class RunSummary(Callback):
    """Times the fit and writes ``run_summary.json`` (rank zero only).

    Args:
        dirpath: the run directory.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.start: float | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or self.start is None:
            return
        model = getattr(pl_module, "model", pl_module)
        summary = {
            "fit_seconds": time.perf_counter() - self.start,
            "steps": int(trainer.global_step),
            "parameters": {r.component: [r.total, r.trainable] for r in parameter_table(model)},
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
