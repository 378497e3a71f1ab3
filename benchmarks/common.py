"""Shared pieces of the benchmarks: configs, model and batches, timing, the results table.

Every figure is measured side by side in one process (the two things compared run in
alternating repeats), after warm-up, as the median over repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mmfuse.allocator import keep_freed_memory
from mmfuse.config import CONFIG_DIR
from mmfuse.freezing import apply_freezing
from mmfuse.lora import apply_lora
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import build_processor_and_model, load_model_dir
from mmfuse.optim import param_groups
from mmfuse.processing.processor import Processor
from mmfuse.scale import enable_gradient_checkpointing
from mmfuse.types import Batch

BENCH_DIR = Path("runs/bench")


def trained_model_from_args(
    description: str,
) -> tuple[argparse.Namespace, MMFuseModel, Processor]:
    """The command line of a benchmark run alone on a trained model directory: ``--ckpt``,
    ``--world``, ``--repeats`` and ``--threads``. Keeps freed memory (as every mmfuse
    command does), sets the torch threads and loads the model (eval mode)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ckpt", default="runs/demo/model")
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    model, processor = load_model_dir(args.ckpt)
    return args, model.eval(), processor


# ----------------------------------------------------------------------------- configs


def compose_train(
    overrides: Sequence[str] = (), output_dir: str | Path | None = None
) -> DictConfig:
    """The ``train`` config (conf/train.yaml) with ``overrides``, as ``mmfuse-train`` composes
    it; ``paths.output_dir`` (a Hydra run directory otherwise) is ``output_dir``."""
    out = Path(output_dir or BENCH_DIR / "work")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", *overrides])


def _plain(node: DictConfig | None) -> dict | None:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def build_model(cfg: DictConfig, seed: int | None = None) -> tuple[Processor, MMFuseModel]:
    """Processor and model as ``mmfuse.train.train`` builds them (freezing, LoRA, gradient
    checkpointing applied), seeded with ``cfg.seed`` unless ``seed`` is given."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    processor, model = build_processor_and_model(cfg)
    apply_freezing(model, _plain(cfg.get("freeze")))
    apply_lora(model, _plain(cfg.get("lora")))
    enable_gradient_checkpointing(model, **(_plain(cfg.get("gradient_checkpointing")) or {}))
    return processor, model


def build_datamodule(cfg: DictConfig, processor: Processor, **overrides: Any):
    """The configured data module (``cfg.data``), set up for fitting, without its
    ``prepare`` step (the benchmark checks the world exists first)."""
    datamodule = instantiate(cfg.data, processor=processor, _convert_="all", **overrides)
    datamodule.setup("fit")
    return datamodule


def train_batches(cfg: DictConfig, processor: Processor, count: int) -> list[Batch]:
    """The first ``count`` training batches of the configured data (its order, batch size and
    collation), loaded in this process: the same batches feed every loop compared."""
    datamodule = build_datamodule(cfg, processor, num_workers=0)
    batches: list[Batch] = []
    while len(batches) < count:  # a small data set: go round again
        for batch in datamodule.train_dataloader():
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def make_optimizer(
    model: torch.nn.Module, cfg: DictConfig, total_steps: int, **optimizer_overrides: Any
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and schedule exactly as ``MMFuseLitModule.configure_optimizers`` builds them
    (same parameter groups, order and settings); ``optimizer_overrides`` change the
    optimiser's keyword arguments (``foreach=False``, ``fused=True``)."""
    factory = instantiate(cfg.optimizer)
    if optimizer_overrides:
        factory.keywords.update(optimizer_overrides)
    lr_scale = OmegaConf.to_container(cfg.lr_scale) if cfg.get("lr_scale") else None
    lr = factory.keywords.get("lr")
    optimizer = factory(params=param_groups(model, cfg.weight_decay, lr_scale, lr))
    scheduler = None
    if cfg.get("scheduler"):
        scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=total_steps)
    return optimizer, scheduler


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The optimiser's parameters in group order (what Lightning clips)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the model's state, to restart every compared run from it."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- timing


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def alternate(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Times several callables side by side: after ``warmup`` calls of each, ``repeats``
    rounds in which each runs once, the order reversed every other round (so slow drift of
    the machine's load falls on all of them alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def matmul_flops_per_second(size: int = 2048, warmup: int = 2, repeats: int = 5) -> float:
    """The machine's fp32 matmul throughput: the median of ``repeats`` (size x size) @
    (size x size) products, 2 size^3 FLOPs each."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = time_calls(lambda: torch.mm(a, b), warmup, repeats)
    return 2.0 * size**3 / median(times)


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table: a figure, how it is shown, its target and whether it holds."""

    key: str
    label: str
    value: float | str | None
    fmt: str = "{:.3g}"
    target: str = ""
    holds: bool | None = None
    note: str = ""

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        if isinstance(self.value, str):
            return self.value
        return self.fmt.format(self.value)


@dataclass
class Report:
    """The figures of a run: a table to print and ``results.json`` (one key per figure)."""

    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        key: str,
        label: str,
        value: float | str | None,
        fmt: str = "{:.3g}",
        target: str = "",
        holds: bool | None = None,
        note: str = "",
    ) -> None:
        self.rows.append(Row(key, label, value, fmt, target, holds, note))

    def table(self) -> str:
        header = ("figure", "value", "target", "holds", "note")
        lines = [
            (r.label, r.shown(), r.target, {True: "yes", False: "NO", None: ""}[r.holds], r.note)
            for r in self.rows
        ]
        widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(4)]
        out = []
        for i, line in enumerate([header, *lines]):
            cells = [
                str(c).ljust(w) if j == 0 else str(c).rjust(w)
                for j, (c, w) in enumerate(zip(line[:4], widths, strict=True))
            ]
            out.append(("  ".join(cells) + (f"  {line[4]}" if line[4] else "")).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {r.key: _finite(r.value) for r in self.rows}
        data["targets"] = {
            r.key: {"target": r.target, "holds": r.holds} for r in self.rows if r.target
        }
        data.update(self.extra)
        return data

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2, default=_json_default) + "\n")
        return path


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those become None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
