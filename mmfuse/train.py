"""Training entry point: ``mmfuse-train [overrides]``."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from mmfuse.allocator import keep_freed_memory
from mmfuse.config import CONFIG_DIR
from mmfuse.evaluation.after_fit import evaluate_after_fit
from mmfuse.freezing import apply_freezing
from mmfuse.init_parts import load_parts
from mmfuse.launch import multirun_ddp_job
from mmfuse.lit_module import MMFuseLitModule
from mmfuse.lora import apply_lora, merge_lora
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import (
    build_processor_and_model,
    load_weights,
    read_model_dir_config,
    save_model_dir,
)
from mmfuse.scale import enable_gradient_checkpointing
from mmfuse.vision_pretrain import pretrain_vision

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Builds everything from ``cfg``, fits, and writes ``<output_dir>/model``.

    With ``init_from`` (a model directory) the model and processor configs are that
    directory's (its architecture and tokenizer) and training starts from its weights.

    Returns:
        The final logged metrics as floats.
    """
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    output_dir = Path(cfg.paths.output_dir)
    init_from = cfg.get("init_from")
    if init_from:
        cfg = _with_model_dir_config(cfg, init_from)
    processor, model = build_processor_and_model(cfg)
    if init_from:
        load_weights(model, init_from)
    init_parts = cfg.get("init_parts")
    if init_parts:
        load_parts(model, processor, init_parts.get("from"), list(init_parts.get("parts") or []))
    if cfg.get("vision_pretrain"):
        if "image" not in model.encoders:
            raise ValueError("vision_pretrain: the model has no vision encoder (model.vision)")
        pretrain_vision(
            model.encoders["image"], processor, cfg.data.train_path, **_plain(cfg.vision_pretrain)
        )
    # freezing first: LoRA adapters in a component configured frozen fail the fit-start check
    frozen = apply_freezing(model, _plain(cfg.get("freeze")))
    apply_lora(model, _plain(cfg.get("lora")))
    enable_gradient_checkpointing(model, **(_plain(cfg.get("gradient_checkpointing")) or {}))
    if cfg.get("compile"):  # in place: parameter names, checkpoints and saving unchanged
        model.compile()
    datamodule = instantiate(cfg.data, processor=processor, _convert_="all")
    module = build_lit_module(cfg, model, frozen)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if not loggers:  # the learning-rate monitor needs a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    with multirun_ddp_job():  # DDP ranks of a multirun job: that job only, in its directory
        try:
            ckpt_path = cfg.get("ckpt_path")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # preempted: last.ckpt holds the end of the last step
            log.warning("SIGTERM: stopped at step %d; resume: ckpt_path=last", trainer.global_step)
            return {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        merge_lora(model)  # the model directory holds plain weights
        model_dir = save_model_dir(model, cfg, output_dir / "model")
        log.info("model saved to %s", model_dir)
        if cfg.get("eval_after_fit"):  # e.g. experiment=world_sweep: every run scored
            evaluate_after_fit(cfg.eval_after_fit, model_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def build_lit_module(cfg: DictConfig, model: MMFuseModel, frozen: list[str]) -> MMFuseLitModule:
    """The LightningModule of a training run: ``model`` with the configured optimiser,
    schedule, weight decay, learning-rate scales and validation decoding; ``frozen`` as
    ``apply_freezing`` returned it."""
    return MMFuseLitModule(
        model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        weight_decay=cfg.weight_decay,
        # plain floats: the checkpoint's hyper-parameters must load with weights_only=True
        lr_scale=OmegaConf.to_container(cfg.lr_scale) if cfg.get("lr_scale") else None,
        generation=instantiate(cfg.generation),
        frozen=frozen,
        loss_weighting=cfg.loss_weighting,
    )


def _plain(node: DictConfig | None) -> dict | None:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def _with_model_dir_config(cfg: DictConfig, model_dir: str) -> DictConfig:
    """A copy of ``cfg`` whose ``model`` and ``processor`` are those saved in ``model_dir``."""
    saved = read_model_dir_config(model_dir)
    log.info("init_from=%s: model and processor configs come from that directory", model_dir)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.model, cfg.processor = saved.model, saved.processor
    return cfg


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper around :func:`train`."""
    keep_freed_memory()
    train(cfg)


if __name__ == "__main__":
    main()
