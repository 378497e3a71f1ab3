"""Side-by-side comparison of training runs: ``mmfuse-compare <run or sweep dir>... [k=v]``.

A run directory is one ``mmfuse-train`` wrote (``config.yaml``, ``csv/metrics.csv``,
``model/``); a directory that is not one is searched for runs (a Hydra sweep directory, a
recipe directory). For every run it reads:

- the evaluation: ``eval/results.json`` (``eval_after_fit``, ``mmfuse-eval`` with
  ablations), else ``eval/metrics.json`` with media and ``eval-blind/metrics.json`` without
  (the ``make demo`` layout);
- ``run_summary.json`` (``callbacks=[default,run_summary]``): fit seconds, steps, parameters
  per component; without it, the parameters counted in ``model/model.safetensors`` and the
  time from ``config.yaml`` (written before the fit) to the saved model (after it, so it
  counts the validation too: marked ``~``);
- ``csv/metrics.csv``: the training (and validation) loss curves;
- the label: the Hydra overrides (``.hydra/overrides.yaml``) that differ between the runs,
  else the run directory's name.

It writes ``compare.md`` (the runs, then the main value of every task with each ablation),
``compare.json``, ``accuracy.png`` (grouped bars: tasks x runs, a panel per ablation) and
``loss.png`` (training loss per step, validation loss dashed) to ``output_dir`` (default
``<the common parent>/compare``) and prints the table and the folder. Settings:
``conf/compare.yaml``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmfuse.config import CONFIG_DIR
from mmfuse.evaluation.ablation import header
from mmfuse.evaluation.scoring import get_value, value_names
from mmfuse.evaluation.table import OVERALL, fmt, markdown
from mmfuse.run_summary import SUMMARY

RESULTS = Path("eval") / "results.json"
# the layout of `make demo`: ablation -> metrics.json
LEGACY = {"none": Path("eval") / "metrics.json", "all": Path("eval-blind") / "metrics.json"}
# overrides that never tell runs apart
_IGNORED_OVERRIDES = re.compile(r"^(hydra|paths)\.|^(threads)$")


@dataclass
class Run:
    """What ``mmfuse-compare`` knows of one run directory.

    Attributes:
        path: the run directory.
        label: its name in tables and plots.
        config: the saved ``config.yaml`` (unresolved interpolations left as they are).
        results: ``{task: {ablation: metrics}}``.
        fit_seconds: training time (validation included); None when unknown.
        fit_exact: whether ``fit_seconds`` was measured (``run_summary.json``) or estimated.
        steps: optimiser steps taken.
        parameters: ``{component: (total, trainable)}``; trainable is None when unknown.
        curves: ``{"train/loss": [(step, value)], "val/loss": [...]}``.
        overrides: the Hydra overrides of the run.
    """

    path: Path
    label: str = ""
    config: DictConfig | None = None
    results: dict = field(default_factory=dict)
    fit_seconds: float | None = None
    fit_exact: bool = False
    steps: int | None = None
    parameters: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- finding runs


def is_run_dir(path: Path) -> bool:
    """A directory ``mmfuse-train`` wrote: ``config.yaml`` and ``model/`` or ``csv/``."""
    return (path / "config.yaml").is_file() and (
        (path / "model").is_dir() or (path / "csv").is_dir()
    )


def _natural(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def find_runs(paths: Sequence[str | Path], max_depth: int = 3) -> list[Path]:
    """The run directories among ``paths`` and under them (in natural order: 2 before 10).

    Raises:
        ValueError: a path that does not exist, or no run at all.
    """
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise ValueError(f"{path}: no such directory")
        if is_run_dir(path):
            found.append(path)
            continue
        inside = sorted(
            (p for depth in range(1, max_depth + 1) for p in path.glob("/".join(["*"] * depth))),
            key=_natural,
        )
        runs = [p for p in inside if p.is_dir() and is_run_dir(p)]
        # a run's own subdirectories are no runs of their own (e.g. model/ has config.yaml)
        found += [r for r in runs if not any(o in r.parents for o in runs)]
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError(f"no run directories (config.yaml with model/ or csv/) in {list(paths)}")
    return unique


# ----------------------------------------------------------------------------- reading


def read_results(run: Path) -> dict:
    """``{task: {ablation: metrics}}`` of a run's evaluation (empty when it has none)."""
    results_file = run / RESULTS
    if results_file.is_file():
        content = json.loads(results_file.read_text())
        out: dict = {}
        for per_checkpoint in content.values():  # one checkpoint: the run's model
            for task, by_ablation in per_checkpoint.items():
                if task == "ablation":  # the changes, not results
                    continue
                out.setdefault(task, {}).update(by_ablation)
        return out
    legacy = {
        a: json.loads((run / p).read_text()) for a, p in LEGACY.items() if (run / p).is_file()
    }
    return {"world": legacy} if legacy else {}


def read_curves(run: Path, keys: Sequence[str] = ("train/loss", "val/loss")) -> dict:
    """``{key: [(step, value), ...]}`` from ``csv/metrics.csv`` (missing keys: no entry)."""
    path = run / "csv" / "metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return curves
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key in keys:
                value = row.get(key)
                if value not in (None, ""):
                    curves.setdefault(key, []).append((int(float(row["step"])), float(value)))
    return curves


def count_parameters(model_dir: Path) -> int | None:
    """The number of weights in ``model.safetensors`` (tied weights are stored once)."""
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())


def read_run(path: Path) -> Run:
    """Everything ``mmfuse-compare`` reads from one run directory."""
    run = Run(path=path, label=path.name)
    run.config = OmegaConf.load(path / "config.yaml")
    run.results = read_results(path)
    run.curves = read_curves(path)
    overrides = path / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        run.overrides = [str(o) for o in OmegaConf.load(overrides)]
    summary = path / SUMMARY
    if summary.is_file():
        content = json.loads(summary.read_text())
        run.fit_seconds, run.fit_exact = content.get("fit_seconds"), True
        run.steps = content.get("steps")
        run.parameters = {k: (v[0], v[1]) for k, v in (content.get("parameters") or {}).items()}
    else:
        weights = path / "model" / "model.safetensors"
        if weights.is_file():
            run.fit_seconds = weights.stat().st_mtime - (path / "config.yaml").stat().st_mtime
        total = count_parameters(path / "model")
        if total is not None:
            run.parameters = {"total": (total, None)}
    if run.steps is None and run.curves.get("train/loss"):
        run.steps = max(step for step, _ in run.curves["train/loss"]) + 1
    return run


def assign_labels(runs: Sequence[Run]) -> None:
    """Labels each run by the overrides that differ between the runs: their values joined by
    ``+`` when every run sets them all (a sweep grid), else ``key=value`` pairs; else by its
    directory name. Labels made unique with the parent directory's name if needed."""
    parsed = [dict(_split_override(o) for o in r.overrides) for r in runs]
    keys = [
        k for k in dict.fromkeys(k for p in parsed for k in p) if not _IGNORED_OVERRIDES.match(k)
    ]
    differing = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    if len(runs) > 1 and differing and all(k in p for p in parsed for k in differing):
        labels = ["+".join(p[k] for k in differing) for p in parsed]  # a grid: values only
    elif len(runs) > 1 and differing:
        labels = [" ".join(f"{_short(k)}={p[k]}" for k in differing if k in p) for p in parsed]
        labels = [label or r.path.name for label, r in zip(labels, runs, strict=True)]
    else:
        labels = [r.path.name for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    for run, label in zip(runs, labels, strict=True):
        run.label = label


def _short(key: str) -> str:
    return re.split(r"[./]", key)[-1]


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def _target_name(config: DictConfig | None, key: str) -> str:
    node = OmegaConf.select(config, key) if config is not None else None
    if node is None:
        return "-"
    target = node.get("_target_", "") if isinstance(node, DictConfig) else str(node)
    return str(target).rsplit(".", 1)[-1] or "-"


# ----------------------------------------------------------------------------- tables


def _duration(seconds: float | None, exact: bool) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{'' if exact else '~'}{minutes}:{secs:02d}"


def _last(curve: Sequence[tuple[int, float]] | None, window: int = 5) -> str:
    if not curve:
        return ""
    values = [v for _, v in curve[-window:]]
    return f"{sum(values) / len(values):.3f}"


def runs_table(runs: Sequence[Run]) -> str:
    """A row per run: its parts, parameters, steps, training time and final losses."""
    rows = []
    for run in runs:
        total, trainable = run.parameters.get("total", (None, None))
        rows.append(
            [
                run.label,
                _target_name(run.config, "model.fusion"),
                _target_name(run.config, "model.conditioning"),
                _target_name(run.config, "model.text"),
                "" if total is None else f"{total:,}",
                "" if trainable is None else f"{trainable:,}",
                "" if run.steps is None else str(run.steps),
                _duration(run.fit_seconds, run.fit_exact),
                _last(run.curves.get("train/loss")),
                _last(run.curves.get("val/loss"), 1),
            ]
        )
    headers = [
        "run",
        "fusion",
        "conditioning",
        "prompt encoder",
        "parameters",
        "trainable",
        "steps",
        "fit time (m:s)",
        "train loss (last 5 logged)",
        "val loss (last)",
    ]
    return markdown(headers, rows, 4)


def ablations_of(runs: Sequence[Run]) -> list[str]:
    """The ablations of any run's evaluation, ``none`` first."""
    names = dict.fromkeys(a for r in runs for per in r.results.values() for a in per)
    return sorted(names, key=lambda a: (a != "none", a != "all", a))


def task_values(runs: Sequence[Run], ablation: str) -> dict[str, dict[str, float]]:
    """``{task/sub-task: {run label: main value}}`` for one ablation (overall rows first)."""
    values: dict[str, dict[str, float]] = {}
    for run in runs:
        for task, per in run.results.items():
            metrics = per.get(ablation)
            if metrics is None:
                continue
            name = value_names(metrics)[0]
            prefix = "" if len(run.results) == 1 else f"{task}: "
            values.setdefault(f"{prefix}{OVERALL}", {})[run.label] = get_value(
                metrics["overall"], name
            )
            for sub, sub_values in sorted(metrics["tasks"].items()):
                values.setdefault(f"{prefix}{sub}", {})[run.label] = get_value(sub_values, name)
    return values


def accuracy_table(runs: Sequence[Run], ablations: Sequence[str]) -> str:
    """A row per task, a column per run; each cell the value with every ablation in turn."""
    per_ablation = {a: task_values(runs, a) for a in ablations}
    tasks = list(dict.fromkeys(t for v in per_ablation.values() for t in v))
    rows = []
    for task in tasks:
        cells = [task]
        for run in runs:
            parts = [fmt(per_ablation[a].get(task, {}).get(run.label)) or "-" for a in ablations]
            cells.append(" / ".join(parts))
        rows.append(cells)
    return markdown(["task", *(r.label for r in runs)], rows, 1)


def report(runs: Sequence[Run]) -> str:
    """The markdown of ``compare.md``."""
    parts = ["# Runs compared", "", runs_table(runs), ""]
    ablations = ablations_of(runs)
    if ablations:
        legend = " / ".join(header(a) for a in ablations)
        parts += [f"## Main value per task ({legend})", "", accuracy_table(runs, ablations), ""]
    else:
        parts += ["(no evaluation results found: eval/results.json or eval/metrics.json)", ""]
    parts += ["Runs:", "", *(f"- {r.label}: {r.path}" for r in runs), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- plots


def plot_accuracy(runs: Sequence[Run], ablations: Sequence[str], path: Path) -> Path | None:
    """Grouped bars: a group per task, a bar per run; one panel per ablation."""
    from matplotlib.figure import Figure

    if not ablations:
        return None
    per_ablation = {a: task_values(runs, a) for a in ablations}
    tasks = list(dict.fromkeys(t for v in per_ablation.values() for t in v))
    width = 0.8 / max(len(runs), 1)
    fig = Figure(figsize=(max(8.0, 0.6 * len(tasks) * max(1, len(runs) / 4)), 3.2 * len(ablations)))
    axes = fig.subplots(len(ablations), 1, squeeze=False)[:, 0]
    for ax, ablation in zip(axes, ablations, strict=True):
        for i, run in enumerate(runs):
            xs = [t + (i - (len(runs) - 1) / 2) * width for t in range(len(tasks))]
            ys = [per_ablation[ablation].get(task, {}).get(run.label, math.nan) for task in tasks]
            ax.bar(xs, ys, width=width, label=run.label, color=f"C{i % 10}")
        ax.set_title(header(ablation))
        ax.set_ylim(0, 1.05)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    rows = math.ceil(len(runs) / 4)
    fig.legend(handles, labels, fontsize=8, ncol=min(4, len(runs)), loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 * rows / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    return path


def _smooth(values: Sequence[float], alpha: float) -> list[float]:
    out, level = [], None
    for value in values:
        level = value if level is None else alpha * level + (1 - alpha) * value
        out.append(level)
    return out


def plot_losses(runs: Sequence[Run], path: Path, smoothing: float = 0.0) -> Path | None:
    """Training loss per step (exponentially smoothed by ``smoothing``), a line per run;
    validation loss dashed in the same colour."""
    from matplotlib.figure import Figure

    if not any(r.curves.get("train/loss") for r in runs):
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for i, run in enumerate(runs):
        train = run.curves.get("train/loss") or []
        if train:
            steps, values = zip(*train, strict=True)
            ax.plot(steps, _smooth(values, smoothing), color=f"C{i % 10}", label=run.label)
        val = run.curves.get("val/loss") or []
        if val:
            steps, values = zip(*val, strict=True)
            ax.plot(steps, values, "--o", color=f"C{i % 10}", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (training; validation dashed)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- main


def default_output_dir(paths: Sequence[str | Path], runs: Sequence[Run]) -> Path:
    """``<the one directory given>/compare`` for one sweep directory, else
    ``<the runs' common parent>/compare``."""
    if len(paths) == 1 and not is_run_dir(Path(paths[0])):
        return Path(paths[0]) / "compare"
    parents = [r.path.parent for r in runs]
    common = Path(*_common_parts([p.parts for p in parents])) if parents else Path(".")
    return common / "compare"


def _common_parts(parts: Sequence[Sequence[str]]) -> list[str]:
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return common or ["."]


def compare(cfg: DictConfig) -> Path:
    """Reads the runs of ``cfg.runs``, writes the report and plots; returns their folder."""
    paths = [str(p) for p in cfg.runs]
    runs = [read_run(p) for p in find_runs(paths)]
    assign_labels(runs)
    out = Path(cfg.output_dir) if cfg.get("output_dir") else default_output_dir(paths, runs)
    out.mkdir(parents=True, exist_ok=True)
    text = report(runs)
    (out / "compare.md").write_text(text)
    content = {
        r.label: {
            "path": str(r.path),
            "results": r.results,
            "fit_seconds": r.fit_seconds,
            "fit_exact": r.fit_exact,
            "steps": r.steps,
            "parameters": r.parameters,
            "overrides": r.overrides,
        }
        for r in runs
    }
    (out / "compare.json").write_text(json.dumps(content, indent=2) + "\n")
    if cfg.get("plots", True):
        plot_accuracy(runs, ablations_of(runs), out / "accuracy.png")
        plot_losses(runs, out / "loss.png", float(cfg.get("loss_smoothing") or 0.0))
    print(text)
    print(f"comparison written to {out}")
    return out


def load_config(args: Sequence[str]) -> DictConfig:
    """``conf/compare.yaml`` with the arguments: directories (no ``=``) go to ``runs``,
    ``key=value`` overrides a setting."""
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "compare.yaml")
    OmegaConf.set_struct(cfg, True)
    dirs = [a for a in args if "=" not in a]
    settings = [a for a in args if "=" in a]
    cfg.merge_with_dotlist(settings)
    if dirs:
        cfg.runs = [*cfg.runs, *dirs]
    if not cfg.runs:
        raise SystemExit("usage: mmfuse-compare <run or sweep dir>... [output_dir=DIR] [k=v]")
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    """``mmfuse-compare <run or sweep dir>... [output_dir=<dir>] [plots=false]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    compare(load_config(args))


if __name__ == "__main__":
    main()
