"""The scale-out trainer configs (FSDP, DeepSpeed ZeRO-2/3), the SLURM launcher and the
gradient-checkpointing switches compose and build."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from omegaconf import OmegaConf
from timm.models.vision_transformer import Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2EncoderLayerStableLayerNorm

from mmfuse.checkpointing import AtomicCheckpointIO
from mmfuse.config import CONFIG_DIR
from mmfuse.loss import next_token_loss
from mmfuse.scale import enable_gradient_checkpointing, layer_classes
from tests.helpers import build_tiny, collate, mixed_records, torch_threads, write_media

TINY_BLOCKS = {LlamaDecoderLayer, Block, Wav2Vec2EncoderLayerStableLayerNorm}


def test_fsdp_config_builds_full_shard_bf16_with_block_policies(compose_train, tmp_path):
    cfg = compose_train(["model=tiny", "trainer=fsdp", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)  # no GPU needed to build the strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == TINY_BLOCKS
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert checkpointing._module_classes == TINY_BLOCKS
    assert strategy._state_dict_type == "full"


def test_block_classes_follow_the_model_config(compose_train, tmp_path) -> None:
    cfg = compose_train(
        ["model=tiny", "model/decoder=gpt2_tiny", "model/text=bert_tiny", "~model/audio"]
    )
    names = {cls.__name__ for cls in layer_classes(cfg.model)}
    assert names == {"GPT2Block", "BertLayer", "Block"}


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_configs(name: str, stage: int, compose_train, tmp_path: Path) -> None:
    cfg = compose_train(["model=tiny", f"trainer={name}", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert cfg.trainer.strategy.stage == stage
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.plugins is None
    accepted = inspect.signature(DeepSpeedStrategy.__init__).parameters
    unknown = set(cfg.trainer.strategy) - {"_target_"} - set(accepted)
    assert not unknown, f"not DeepSpeedStrategy arguments: {unknown}"
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed: the config composes, the strategy is not built")
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy.config["zero_optimization"]["stage"] == stage


def test_cpu_trainers_write_checkpoints_atomically(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(["trainer=cpu", f"paths.output_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_slurm_launcher_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4
    assert launcher["nodes"] == 2
    subdir = cfg.hydra.sweep._get_node("subdir")._value()
    assert subdir == "${hydra.job.num}", "each job its own directory"


def test_gradient_checkpointing_switches_keep_loss_and_gradients(tmp_path: Path) -> None:
    write_media(tmp_path)
    with torch_threads(1):
        proc, plain, _ = build_tiny(tmp_path / "a", seed=0)
        _, checkpointed, _ = build_tiny(tmp_path / "b", seed=0)
        parts = enable_gradient_checkpointing(checkpointed, decoder=True, encoders=True)
        assert parts == ["decoder", "encoders.image", "encoders.audio"]
        assert checkpointed.decoder.is_activation_checkpointing
        assert checkpointed.encoders["image"].backbone.grad_checkpointing
        assert checkpointed.encoders["audio"].backbone.is_activation_checkpointing
        batch = collate(proc, mixed_records(), tmp_path)
        grads = []
        for model in (plain, checkpointed):
            model.train()
            torch.manual_seed(1)  # same dropout masks (recomputation replays the RNG)
            loss, _ = next_token_loss(*model(batch))
            loss.backward()
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_gradient_checkpointing_is_configured_off_by_default(compose_train) -> None:
    cfg = compose_train([])
    assert cfg.gradient_checkpointing == {"decoder": False, "encoders": False}
