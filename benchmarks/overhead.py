"""Framework overhead: a Lightning training step of mmfuse against a hand-written loop.

Both train the same model from the same initial state on the same batches (collated once,
held in memory: the data pipeline is measured on its own in ``data_pipeline.py``) with the
same AdamW parameter groups, schedule and gradient clipping, fp32 on the CPU:

- Lightning: the real ``MMFuseLitModule`` in the configured ``Trainer`` with the configured
  callbacks (non-finite guard and gradient-norm logging, checkpoints, learning-rate monitor,
  progress bar) and loggers (CSV), as ``mmfuse-train`` builds them.
- plain: forward, ``next_token_loss``, backward, ``clip_grad_norm_``, ``optimizer.step()``,
  ``scheduler.step()``, ``zero_grad()``.

The two run in lockstep (``measure_overhead``): the plain step runs on the same batch, on a
copy of the model, inside a callback between Lightning steps, with the Lightning clock
paused; so both see the same machine load, step by step. A Lightning step's time is the
interval between the ends of two consecutive steps (the plain step taken out), so
everything the loop does between steps counts (hooks, logging, fetching the next batch).
Each repeat runs ``warmup`` untimed steps then the timed ones (one logging interval by
default, so logging is included at its configured rate).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from benchmarks.common import clone_state, make_optimizer, median, optimizer_params
from mmfuse.freezing import apply_freezing
from mmfuse.loss import next_token_loss
from mmfuse.model import MMFuseModel
from mmfuse.train import build_lit_module
from mmfuse.types import Batch


@dataclass
class LoopRun:
    """The start of the first step, every step's end time and loss, of one run."""

    start: float
    ends: list[float]
    losses: list[float]

    def durations(self) -> list[float]:
        """Seconds of each step (from the previous step's end)."""
        marks = [self.start, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def step_time(self, warmup: int) -> float:
        """Mean seconds per step over the steps after the first ``warmup``."""
        timed = len(self.ends) - warmup
        return (self.ends[-1] - self.ends[warmup - 1]) / timed


class _BatchList(torch.utils.data.Dataset):
    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


def _same(batch: Batch) -> Batch:
    return batch


class _StepClock(Callback):
    """Seeds torch's RNG before the first step (dropout then draws what the plain loop draws)
    and records the end time and loss of every training step."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.start = 0.0
        self.ends: list[float] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.manual_seed(self.seed)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.losses.append(outputs["loss"].detach())


@contextlib.contextmanager
def quiet(log_file: Path | None = None) -> Iterator[None]:
    """Lightning's info messages, warnings and progress bar (stdout) go to ``log_file`` (or
    nowhere) instead of the terminal; the progress bar is still drawn (its cost counts)."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    sink = log_file.open("a") if log_file else io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(sink),
            contextlib.redirect_stdout(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        sink.close()


def lightning_trainer(cfg: DictConfig, steps: int, extra_callbacks: list[Callback]):
    """The configured Trainer (callbacks and loggers as ``mmfuse-train`` instantiates them),
    stopping after ``steps`` steps."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(
        cfg.trainer,
        callbacks=[*callbacks, *extra_callbacks],
        logger=loggers or False,
        max_steps=steps,
        max_epochs=1,
        enable_model_summary=False,
    )


def run_lightning(
    cfg: DictConfig, model: MMFuseModel, batches: list[Batch], log_file: Path | None = None
) -> LoopRun:
    """Trains ``model`` on ``batches`` (one step each) with the Lightning module and Trainer."""
    frozen = apply_freezing(model, _plain(cfg.get("freeze")))
    clock = _StepClock(int(cfg.seed))
    loader = DataLoader(_BatchList(batches), batch_size=None, collate_fn=_same)
    with quiet(log_file):
        trainer = lightning_trainer(cfg, len(batches), [clock])
        trainer.fit(build_lit_module(cfg, model, frozen), train_dataloaders=loader)
    return LoopRun(clock.start, clock.ends, [float(x) for x in clock.losses])


def run_plain(
    cfg: DictConfig,
    model: MMFuseModel,
    batches: list[Batch],
    compiled: torch.nn.Module | None = None,
) -> LoopRun:
    """Trains ``model`` on ``batches`` with the hand-written loop (``PlainLoop``).
    ``compiled`` (``torch.compile(model)``) runs the forward instead of ``model`` when
    given."""
    loop = PlainLoop(cfg, model, len(batches), forward=compiled)
    ends, losses = [], []
    torch.manual_seed(int(cfg.seed))
    start = time.perf_counter()
    for batch in batches:
        losses.append(loop.step(batch))
        ends.append(time.perf_counter())
    return LoopRun(start, ends, [float(x) for x in losses])


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


class PlainLoop:
    """The hand-written training step, one call per batch: the same optimiser, schedule,
    clipping (``trainer.gradient_clip_val``) and loss as the Lightning module."""

    def __init__(
        self,
        cfg: DictConfig,
        model: MMFuseModel,
        total_steps: int,
        forward: torch.nn.Module | None = None,
    ) -> None:
        self.model = model
        self.forward = model if forward is None else forward
        self.optimizer, self.scheduler = make_optimizer(model, cfg, total_steps=total_steps)
        self.params = optimizer_params(self.optimizer)
        self.clip = cfg.trainer.get("gradient_clip_val")
        model.train()

    def step(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        logits, labels = self.forward(batch)
        loss, _ = next_token_loss(logits, labels, batch.ids)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach()


class _Lockstep(Callback):
    """Runs the plain loop's step on the same batch next to every Lightning step, on a copy
    of the model, and times both: the plain step runs inside this callback's hooks (before
    Lightning's step on even batches, after it on odd ones) with the Lightning clock paused,
    so the Lightning time of a step is everything from the end of the previous step to the
    end of this one (hooks, logging, fetching the batch) but the plain step. Each loop has
    its own RNG stream, seeded alike (dropout draws the same in both)."""

    def __init__(self, plain: PlainLoop, seed: int) -> None:
        self.plain, self.seed = plain, seed
        self.lightning_times: list[float] = []
        self.plain_times: list[float] = []
        self.lightning_losses: list[torch.Tensor] = []
        self.plain_losses: list[torch.Tensor] = []
        self._elapsed = 0.0
        self._mark = 0.0
        self._plain_rng: torch.Tensor | None = None

    def _run_plain(self, batch: Batch) -> None:
        self._elapsed += time.perf_counter() - self._mark
        lightning_rng = torch.get_rng_state()
        torch.set_rng_state(self._plain_rng)
        with torch.enable_grad():
            start = time.perf_counter()
            self.plain_losses.append(self.plain.step(batch))
            self.plain_times.append(time.perf_counter() - start)
        self._plain_rng = torch.get_rng_state()
        torch.set_rng_state(lightning_rng)
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.manual_seed(self.seed)
            self._plain_rng = torch.get_rng_state()
            self._elapsed, self._mark = 0.0, time.perf_counter()
        if batch_idx % 2 == 0:
            self._run_plain(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lightning_times.append(self._elapsed + time.perf_counter() - self._mark)
        self.lightning_losses.append(outputs["loss"].detach())
        self._elapsed, self._mark = 0.0, time.perf_counter()
        if batch_idx % 2 == 1:
            self._run_plain(batch)


@dataclass
class OverheadResult:
    lightning_s: float  # median over repeats of the mean timed step
    plain_s: float
    ratio: float  # median over repeats of (Lightning time / plain time) of the timed steps
    max_abs_loss_diff: float
    ratios: list[float]
    lightning_times: list[float]
    plain_times: list[float]
    losses: list[float]


def measure_overhead(
    cfg: DictConfig,
    model: MMFuseModel,
    batches: list[Batch],
    warmup: int,
    repeats: int,
    log_file: Path | None = None,
) -> OverheadResult:
    """Lightning vs plain step time on ``batches``, the two loops in lockstep (see
    ``_Lockstep``): ``warmup`` untimed steps, the rest timed, ``repeats`` runs, each from the
    model's current state.

    Returns medians over repeats, the ratio (Lightning / plain) and the largest absolute
    difference of the per-step losses between the two loops.
    """
    if len(batches) <= warmup:
        raise ValueError(f"{len(batches)} batches for {warmup} warm-up steps")
    start_state = clone_state(model)
    frozen = apply_freezing(model, _plain(cfg.get("freeze")))
    loader = DataLoader(_BatchList(batches), batch_size=None, collate_fn=_same)
    light_s, plain_s, ratios, diffs = [], [], [], []
    losses: list[float] = []
    for _ in range(repeats):
        model.load_state_dict(start_state)
        twin = copy.deepcopy(model, memo={id(model.tokenizer): model.tokenizer})
        lockstep = _Lockstep(PlainLoop(cfg, twin, len(batches)), int(cfg.seed))
        with quiet(log_file):
            trainer = lightning_trainer(cfg, len(batches), [lockstep])
            trainer.fit(build_lit_module(cfg, model, frozen), train_dataloaders=loader)
        light = sum(lockstep.lightning_times[warmup:])
        plain = sum(lockstep.plain_times[warmup:])
        timed = len(batches) - warmup
        light_s.append(light / timed)
        plain_s.append(plain / timed)
        ratios.append(light / plain)
        pairs = zip(lockstep.lightning_losses, lockstep.plain_losses, strict=True)
        diffs.append(max(abs(float(a) - float(b)) for a, b in pairs))
        losses = [float(x) for x in lockstep.plain_losses]
    model.load_state_dict(start_state)
    return OverheadResult(
        median(light_s), median(plain_s), median(ratios), max(diffs), ratios, light_s,
        plain_s, losses,
    )  # fmt: skip


# ----------------------------------------------------------------------------- host syncs

_SYNCS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index",
}


class HostSyncCounter(TorchFunctionMode):
    """Counts calls that read a tensor's value on the host (``.item()``, ``bool(t)``,
    ``float(t)``, ``int(t)``, ``.tolist()``): each one waits for the device on a GPU.

    Calls are attributed to the first frame outside torch (``file:line function``); those
    made inside ``torch.optim`` read the optimisers' step counters, which live on the CPU
    (no device wait), and are counted apart.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.optimizer_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _SYNCS.get(func)
        if kind is not None:
            self._record(kind)
        return func(*args, **(kwargs or {}))

    def _record(self, kind: str) -> None:
        frame = sys._getframe(2)
        in_optim = False
        torch_dir = str(Path(torch.__file__).parent)
        while frame is not None and (
            frame.f_code.co_filename.startswith(torch_dir) or frame.f_code.co_filename == __file__
        ):
            in_optim |= "/optim/" in frame.f_code.co_filename
            frame = frame.f_back
        if in_optim:
            self.optimizer_calls += 1
            return
        where = "?" if frame is None else _where(frame)
        self.calls[f"{kind} at {where}"] += 1


def _where(frame) -> str:
    """``file:line function``, the file relative to site-packages or the working directory."""
    path = Path(frame.f_code.co_filename)
    if "site-packages" in path.parts:
        path = Path(*path.parts[path.parts.index("site-packages") + 1 :])
    elif path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    return f"{path}:{frame.f_lineno} {frame.f_code.co_name}"


class _SyncWindow(Callback):
    """Counts host reads in the steps after the first ``skip`` (end of step ``skip`` - 1 to
    the end of the last step)."""

    def __init__(self, skip: int, last: int) -> None:
        self.skip, self.last = skip, last
        self.counter = HostSyncCounter()
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.skip - 1:
            self.counter.__enter__()
        elif batch_idx == self.last:
            self.counter.__exit__(None, None, None)
            self.steps = self.last - self.skip + 1


def count_host_syncs(
    cfg: DictConfig, model: MMFuseModel, batches: list[Batch], skip: int = 1
) -> tuple[float, Counter[str], int]:
    """Host reads per Lightning training step over ``batches[skip:]``.

    Returns (reads per step outside torch.optim, reads by place, reads in torch.optim).
    """
    start_state = clone_state(model)
    frozen = apply_freezing(model, _plain(cfg.get("freeze")))
    window = _SyncWindow(skip, len(batches) - 1)
    loader = DataLoader(_BatchList(batches), batch_size=None, collate_fn=_same)
    with quiet():
        trainer = lightning_trainer(cfg, len(batches), [window])
        trainer.fit(build_lit_module(cfg, model, frozen), train_dataloaders=loader)
    model.load_state_dict(start_state)
    calls = window.counter.calls
    steps = max(window.steps, 1)
    return sum(calls.values()) / steps, calls, window.counter.optimizer_calls
