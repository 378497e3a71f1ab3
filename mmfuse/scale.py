"""Pieces for training large models: the transformer block classes of a model config (FSDP
wrapping and activation checkpointing) and gradient-checkpointing switches.

Block classes, from the model config alone (no weights are loaded):

- transformers parts (decoder, audio, prompt encoder, a transformers vision encoder): the
  architecture config (the part's ``config`` node, or ``AutoConfig`` of its ``pretrained``
  directory) picks the model class through the transformers auto mappings; its
  ``_no_split_modules`` (the classes transformers itself keeps whole when sharding, e.g.
  ``LlamaDecoderLayer``, ``BertLayer``) are the blocks, embedding modules left out. A class
  that declares none (``Wav2Vec2Model``) is built from the config on the meta device and its
  blocks are found as below.
- other parts (timm vision): the part is built on the meta device (no memory, no weights)
  and the blocks are the children of its ``blocks`` / ``layers`` / ``layer`` module lists
  (timm ViT: ``vision_transformer.Block``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

_BLOCK_LISTS = ("blocks", "layers", "layer")


def layer_classes(model: DictConfig | Mapping[str, Any]) -> set[type[nn.Module]]:
    """The transformer block classes of the decoder and encoders of a ``model`` config.

    Used as FSDP's ``auto_wrap_policy`` and ``activation_checkpointing_policy``
    (``conf/trainer/fsdp.yaml``): each block is one shard unit and one recomputation unit.

    Raises:
        ValueError: naming the part when no block class can be found.
    """
    if not isinstance(model, DictConfig):
        model = OmegaConf.create(dict(model))
    classes: set[type[nn.Module]] = set()
    for part in ("decoder", "text", "vision", "audio"):
        node = model.get(part)
        if node is None:
            continue
        found = _part_blocks(node, part)
        if not found:
            raise ValueError(f"model.{part}: no transformer block class found")
        classes |= found
    return classes


def _part_blocks(node: DictConfig, part: str) -> set[type[nn.Module]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    config = _hf_config(node)
    if config is None:  # not a transformers model (timm): build it without memory
        with torch.device("meta"):
            return block_classes(instantiate(node, _convert_="all"))
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if part == "decoder" else MODEL_MAPPING
    try:
        model_class = mapping[type(config)]
    except KeyError as err:
        raise ValueError(
            f"model.{part}: no transformers model for {type(config).__name__}"
        ) from err
    declared = _classes_by_name(model_class, model_class._no_split_modules or [])
    if declared:
        return declared
    with torch.device("meta"):
        return block_classes(model_class._from_config(config))


def _hf_config(node: DictConfig) -> PretrainedConfig | None:
    """The transformers architecture config of a part, or None for other libraries."""
    pretrained = node.get("pretrained")
    if pretrained and (Path(str(pretrained)) / "config.json").is_file():
        return AutoConfig.from_pretrained(str(pretrained))
    config = node.get("config")
    if config is not None and str(config.get("_target_", "")).startswith("transformers."):
        return instantiate(config, _convert_="all")
    return None


def _classes_by_name(model_class: type[PreTrainedModel], names: list[str]) -> set[type]:
    module = importlib.import_module(model_class.__module__)
    found = set()
    for name in names:
        if "Embedding" in name:
            continue
        cls = getattr(module, name, None)
        if cls is None:
            log.warning("%s: block class %s not found in %s", model_class.__name__, name, module)
            continue
        found.add(cls)
    return found


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """Classes of the children of every ``blocks``/``layers``/``layer`` module list."""
    classes = set()
    for name, child in module.named_modules():
        if name.rsplit(".", 1)[-1] in _BLOCK_LISTS and isinstance(
            child, (nn.ModuleList, nn.Sequential)
        ):
            classes.update(type(block) for block in child.children())
    return classes


def enable_gradient_checkpointing(
    model: nn.Module, decoder: bool = False, encoders: bool = False
) -> list[str]:
    """Switches on activation (gradient) checkpointing: activations inside each block are
    recomputed in the backward pass instead of kept (less memory, about a third more compute).

    transformers models use ``activation_checkpointing_enable`` (non-reentrant), timm models
    ``set_grad_checkpointing``. Do not combine with FSDP's ``activation_checkpointing_policy``
    on the same blocks.

    Args:
        model: an ``MMFuseModel``.
        decoder: the decoder.
        encoders: every encoder backbone.

    Returns:
        The parts switched on, e.g. ``["decoder", "encoders.image"]``.

    Raises:
        ValueError: naming an encoder whose backbone supports neither.
    """
    parts = []
    if decoder:
        _enable(model.decoder, "decoder")
        parts.append("decoder")
    if encoders:
        for name, encoder in model.encoders.items():
            _enable(encoder.backbone, f"encoders.{name}")
            parts.append(f"encoders.{name}")
    return parts


def _enable(module: nn.Module, name: str) -> None:
    if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
        module.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    elif hasattr(module, "set_grad_checkpointing"):
        module.set_grad_checkpointing(True)
    else:
        raise ValueError(f"{name}: {type(module).__name__} has no gradient checkpointing")
