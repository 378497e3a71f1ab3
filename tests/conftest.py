"""Shared fixtures: a tiny built-in world and the real train config, shrunk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from data_modules.world import WorldSize, generate_world
from mmfuse.config import CONFIG_DIR
from tests.helpers import torch_threads, write_media

TINY_WORLD = WorldSize(n_train=132, n_val_per_task=2, n_test_per_task=3, multi_turn_fraction=0.5)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny world (132 train records, 22 val, 33 test), generated once per session."""
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, size=TINY_WORLD, workers=1)
    return out


def tiny_train_overrides(world: Path, output_dir: Path) -> list[str]:
    """Overrides that turn the real train config into a seconds-long tiny run."""
    return [
        "model=tiny",
        "data=jsonl",
        f"data.train_path={world / 'train.jsonl'}",
        f"data.val_path={world / 'val.jsonl'}",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        f"paths.output_dir={output_dir}",
        "trainer.max_steps=6",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=6",
        "+trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null",
        "generation.max_new_tokens=8",
    ]


@pytest.fixture
def compose_train() -> Callable[..., DictConfig]:
    """compose_train(overrides) -> the train config composed from conf/ with overrides."""

    def _compose(overrides: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=overrides)

    return _compose


@pytest.fixture(scope="session")
def trained_run(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the tiny model trained a few steps on the tiny world."""
    from mmfuse.train import train

    out = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=tiny_train_overrides(world_dir, out))
    train(cfg)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Model-heavy unit-test modules run torch on one thread (no oversubscription)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with small test media (see ``tests.helpers.write_media``)."""
    base = tmp_path_factory.mktemp("media")
    write_media(base)
    return base
