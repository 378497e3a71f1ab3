"""The same seed gives bitwise-identical losses; two DDP processes on CPU give the losses of
one process with the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mmfuse.train import train

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
# the ranks see different rows: dropout masks would differ from one process's
NO_DROPOUT = [
    f"+model.audio.config.{name}=0.0"
    for name in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout")
]


def _overrides(world: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "data=jsonl",
        f"data.train_path={world / 'train.jsonl'}",
        "data.val_path=null",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "threads=1",
        "callbacks.progress_bar=null",
        *extra,
    ]


def _losses(out: Path) -> list[str]:
    with (out / "csv" / "metrics.csv").open() as handle:
        return [row["train/loss"] for row in csv.DictReader(handle) if row.get("train/loss")]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_same_seed_bitwise_identical_losses(world_dir: Path, tmp_path: Path, compose_train):
    for name in ("a", "b"):  # dropout on: the seeded RNG is part of what must repeat
        train(compose_train([*_overrides(world_dir, 8), f"paths.output_dir={tmp_path / name}"]))
    assert len(_losses(tmp_path / "a")) == STEPS
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ddp_cpu_processes_equal_one_with_the_global_batch(
    world_dir: Path, tmp_path: Path, compose_train
) -> None:
    single = tmp_path / "single"
    train(compose_train([*_overrides(world_dir, 8, *NO_DROPOUT), f"paths.output_dir={single}"]))

    ddp = tmp_path / "ddp"
    command = [
        str(REPO / ".venv" / "bin" / "mmfuse-train"),
        *_overrides(world_dir, 4, *NO_DROPOUT),
        "trainer=ddp_cpu",
        f"hydra.run.dir={ddp}",
    ]
    result = subprocess.run(
        command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]

    expected = [float(x) for x in _losses(single)]
    got = [float(x) for x in _losses(ddp)]
    assert len(got) == STEPS
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    a, b = _weights(single), _weights(ddp)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)  # Adam: fp noise

    # one run directory, written by rank 0 (rank 1 adds only its Hydra job log)
    names = {p.name for p in ddp.iterdir()}
    assert names <= {
        ".hydra",
        "csv",
        "checkpoints",
        "model",
        "config.yaml",
        "train.log",
        "train_ddp_process_1.log",
    }, names
    assert {p.name for p in (ddp / "csv").iterdir()} <= {"metrics.csv", "hparams.yaml"}
    assert {p.name for p in (ddp / "checkpoints").iterdir()} == {"last.ckpt"}
