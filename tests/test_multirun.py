"""Hydra multirun with DDP on CPU: each job trains with both ranks in its own directory, and
no rank starts the sweep again."""

from __future__ import annotations

import subprocess
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent


def test_multirun_of_ddp_jobs(world_dir: Path, tmp_path: Path) -> None:
    command = [
        str(REPO / ".venv" / "bin" / "mmfuse-train"),
        "-m",
        "trainer=ddp_cpu",
        "model=tiny",
        "data=jsonl",
        f"data.train_path={world_dir / 'train.jsonl'}",
        "data.val_path=null",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.enable_model_summary=false",
        "threads=1",
        "callbacks.progress_bar=null",
        "optimizer.lr=1e-3,2e-3",
        # a rank that started the sweep again would make a second, later sweep directory
        f"hydra.sweep.dir={tmp_path}/sweep-${{now:%H%M%S%f}}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("Launching 2 jobs") == 1, "only the sweep's own process launches jobs"
    (sweep,) = list(tmp_path.iterdir())
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        run = sweep / job
        assert OmegaConf.load(run / "config.yaml").optimizer.lr == lr
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "model" / "model.safetensors").is_file()
        assert (run / "csv").is_dir()
        assert (run / "train_ddp_process_1.log").is_file(), "rank 1 ran in the job's directory"
