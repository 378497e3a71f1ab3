"""Helpers for the evaluation tests: the task samples with their media, a tiny model
directory and the eval config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mmfuse.config import CONFIG_DIR
from mmfuse.loss import next_token_loss
from mmfuse.model_dir import save_model_dir
from tests.helpers import build_tiny, collate, write_png, write_wav

SAMPLES = Path(__file__).resolve().parent / "data" / "eval"


def write_eval_data(out: Path) -> Path:
    """Copies ``tests/data/eval/*.jsonl`` to ``out`` and writes their media; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for path in SAMPLES.glob("*.jsonl"):
        shutil.copy(path, out / path.name)
    write_png(out / "media" / "red.png", (255, 0, 0))
    write_png(out / "media" / "blue.png", (0, 0, 255))
    write_wav(out / "media" / "low.wav", 440.0, 0.5)
    write_wav(out / "media" / "high.wav", 880.0, 0.5)
    return out


def save_tiny_model(out: Path, seed: int = 0) -> Path:
    """The untrained tiny model (``model=tiny``, seeded) saved as a model directory."""
    _, model, cfg = build_tiny(out / "build", seed=seed)
    return save_model_dir(model, cfg, out / "model")


def eval_cfg(*overrides: str) -> DictConfig:
    """``conf/eval.yaml`` composed with ``overrides`` (single-process loaders)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=["num_workers=0", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def memorised_model(out: Path, records: list[dict], base_dir: Path, steps: int = 60) -> Path:
    """The tiny model trained full-batch on ``records`` until it answers them, saved as a
    model directory ``out/model``."""
    proc, model, cfg = build_tiny(out / "build", seed=0)
    batch = collate(proc, records, base_dir)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = next_token_loss(*model(batch))
        loss.backward()
        optimizer.step()
    return save_model_dir(model.eval(), cfg, out / "model")
