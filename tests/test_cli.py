"""The console scripts, run as a user runs them (subprocesses)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from mmfuse.chat import chat
from mmfuse.config import CONFIG_DIR
from tests.conftest import tiny_train_overrides

BIN = Path(sys.executable).parent


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_ddp_cpu_two_processes_fit(world_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_train_overrides(world_dir, tmp_path)
    overrides = [o for o in overrides if not o.startswith("paths.output_dir")]
    result = _run(
        "mmfuse-train",
        "trainer=ddp_cpu",
        f"hydra.run.dir={tmp_path}",
        *overrides,
        "trainer.max_steps=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2]
    assert not list(tmp_path.glob("*rank*")), "one run directory for all ranks"


def test_unknown_key_on_the_command_line(tmp_path: Path) -> None:
    result = _run("mmfuse-train", "model=tiny", "model.no_such_part=3", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "no_such_part" in result.stderr


def test_eval_and_chat_commands(trained_run: Path, world_dir: Path, tmp_path: Path) -> None:
    result = _run(
        "mmfuse-eval",
        f"ckpt={trained_run / 'model'}",
        f"data.path={world_dir / 'test.jsonl'}",
        f"output_dir={tmp_path}",
        "generation.max_new_tokens=6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "image/color" in result.stdout and f"{metrics['overall']:.3f}" in result.stdout
    lines = (world_dir / "test.jsonl").read_text().splitlines()
    record = next(r for r in map(json.loads, lines) if r["task"].startswith("image/"))
    image = world_dir / record["messages"][0]["content"][0]["path"]
    result = _run(
        "mmfuse-chat",
        f"ckpt={trained_run / 'model'}",
        "prompt=What color is it?",
        f"image={image}",
        "generation.max_new_tokens=6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "chat",
            overrides=[
                f"ckpt={trained_run / 'model'}",
                "prompt=What color is it?",
                f"image={image}",
                "generation.max_new_tokens=6",
            ],
        )
    assert result.stdout == f"{chat(cfg, stdout=io.StringIO())}\n"
    result = _run("mmfuse-chat", f"ckpt={trained_run / 'model'}", "prompt=hi", "image=/nope.png")
    assert result.returncode == 2 and "image file not found: /nope.png" in result.stderr
