"""Exact resume: SIGKILL mid-epoch and resume equals an uninterrupted run; SIGTERM writes a
complete checkpoint and exits cleanly; a write that dies half-way never becomes `last`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfuse.checkpointing import TMP_PREFIX, AtomicCheckpointIO
from mmfuse.train import train

REPO = Path(__file__).resolve().parent.parent
STEPS = 13  # 132 records in batches of 16: 9 steps in epoch 0, 4 in epoch 1


def _overrides(world: Path, out: Path, every: int, steps: int = STEPS) -> list[str]:
    """A tiny run with dropout on (the RNG matters), no validation, ids recorded per step."""
    return [
        "model=tiny",
        "data=jsonl",
        f"data.train_path={world / 'train.jsonl'}",
        "data.val_path=null",
        "data.batch_size=16",
        "data.num_workers=0",
        "trainer.max_epochs=2",
        f"trainer.max_steps={steps}",
        "trainer.enable_model_summary=false",
        "logger=none",
        "threads=1",
        "callbacks.progress_bar=null",
        "callbacks.model_checkpoint=null",
        "callbacks.early_stopping=null",
        f"callbacks.last_checkpoint.every_n_train_steps={every}",
        "+callbacks.ids._target_=tests.faults.RecordIds",
        f"+callbacks.ids.path={out / 'ids.jsonl'}",
    ]


def _run_in_process(compose_train, world: Path, out: Path, every: int, *extra: str) -> None:
    train(compose_train([*_overrides(world, out, every), f"paths.output_dir={out}", *extra]))


def _run_subprocess(world: Path, out: Path, every: int, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "mmfuse.train",
        *_overrides(world, out, every),
        f"hydra.run.dir={out}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ids.jsonl").read_text().splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hydra import compose, initialize_config_dir

    from mmfuse.config import CONFIG_DIR

    out = tmp_path_factory.mktemp("uninterrupted")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=[*_overrides(world_dir, out, 4), f"paths.output_dir={out}"]
        )
    train(cfg)
    return out


def test_checkpoint_holds_everything_and_loads_weights_only(uninterrupted: Path) -> None:
    checkpoint = _load(uninterrupted / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == STEPS
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == [{"epoch": 1, "samples": 4 * 16, "seed": 0}]
    rng = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ResumeState"))
    assert set(rng["ranks"][0]) == {"torch", "cuda", "numpy", "python"}
    assert checkpoint["hyper_parameters"]["weight_decay"] == pytest.approx(0.01)
    steps = _steps(uninterrupted)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    epoch0 = [i for s in steps if s["epoch"] == 0 for i in s["ids"]]
    assert len(epoch0) == len(set(epoch0)) == 132, "every record once in the first epoch"


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    uninterrupted: Path, world_dir: Path, tmp_path: Path, compose_train
) -> None:
    out = tmp_path / "run"
    killed = _run_subprocess(
        world_dir,
        out,
        4,
        "+callbacks.kill._target_=tests.faults.SignalAt",
        "+callbacks.kill.at_step=6",
        "+callbacks.kill.signal=SIGKILL",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _load(out / "checkpoints" / "last.ckpt")["global_step"] == 4
    seen_before_kill = _steps(out)
    assert [s["step"] for s in seen_before_kill] == [1, 2, 3, 4, 5, 6]

    _run_in_process(compose_train, world_dir, out, 4, "ckpt_path=last")

    resumed = _steps(out)[len(seen_before_kill) :]
    assert [s["step"] for s in resumed] == list(range(5, STEPS + 1))
    ids = [s["ids"] for s in seen_before_kill[:4] + resumed]
    assert ids == [s["ids"] for s in _steps(uninterrupted)], "no sample repeated or skipped"
    expected = _load(uninterrupted / "checkpoints" / "last.ckpt")["state_dict"]
    got = _load(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


def test_sigterm_writes_a_complete_checkpoint_and_exits_cleanly(
    world_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = _run_subprocess(
        world_dir,
        out,
        0,
        "+callbacks.term._target_=tests.faults.SignalAt",
        "+callbacks.term.at_step=3",
        "+callbacks.term.signal=SIGTERM",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = _load(out / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4, "saved at the end of the step SIGTERM arrived in"
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == [{"epoch": 0, "samples": 4 * 16, "seed": 0}]
    assert checkpoint["optimizer_states"] and checkpoint["state_dict"]
    assert [s["step"] for s in _steps(out)] == [1, 2, 3, 4]
    assert not (out / "model").exists(), "an unfinished run writes no model directory"
    assert "SIGTERM" in result.stderr


def test_write_dying_half_way_never_becomes_last(
    world_dir: Path, tmp_path: Path, compose_train, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    dump = AtomicCheckpointIO._dump

    def dies_half_way(checkpoint: dict, handle) -> None:
        if checkpoint["global_step"] != 4:
            return dump(checkpoint, handle)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        raise OSError("simulated crash half-way through the checkpoint write")

    monkeypatch.setattr(AtomicCheckpointIO, "_dump", staticmethod(dies_half_way))
    with pytest.raises(OSError, match="half-way"):
        _run_in_process(compose_train, world_dir, out, 2, "trainer.max_steps=6")
    checkpoints = out / "checkpoints"
    assert _load(checkpoints / "last.ckpt")["global_step"] == 2, "the previous good one"
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(TMP_PREFIX)]

    # a write killed outright leaves its temporary file: never taken for `last`, removed
    # when training starts again
    stale = checkpoints / f"{TMP_PREFIX}last.ckpt.99999"
    stale.write_bytes(b"half a checkpoint")
    monkeypatch.setattr(AtomicCheckpointIO, "_dump", staticmethod(dump))
    _run_in_process(compose_train, world_dir, out, 2, "trainer.max_steps=6", "ckpt_path=last")
    assert not stale.exists()
    assert _load(checkpoints / "last.ckpt")["global_step"] == 6
    resumed = [s["step"] for s in _steps(out)]
    assert resumed[-4:] == [3, 4, 5, 6], "resumed from step 2"
