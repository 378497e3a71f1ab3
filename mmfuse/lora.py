"""LoRA adapters through peft, injected in place, and merged back into plain weights.

The ``lora`` config (the ``conf/lora/`` group; none by default)::

    r: 8            # rank, alpha and dropout for every component...
    alpha: 16
    dropout: 0.05
    components:
      decoder: {target_modules: all-linear}      # ...or per component: {r: 4, ...}
      encoders:
        image: {target_modules: [qkv], trainable: ["norm\\\\..*"]}
        audio: true                              # shorthand: {target_modules: all-linear}

A component's adapters go into its pretrained part: the whole decoder, or an encoder's
``backbone`` (its ``proj`` into the fusion width keeps training in full). In that part every
base parameter is frozen except those ``trainable`` names (regexes, whole-name match,
relative to the part) that were trainable before; adapters are trainable. ``target_modules``
is peft's: module-name suffixes, one regex string, or ``all-linear`` (every Linear/Conv1D but
the output layer).

Adapters are injected with ``peft.inject_adapter_in_model``: the model keeps its type and
parameter names stay as they were apart from ``.base_layer`` and ``.lora_*``, so the decoder
is still a transformers model for generation. :func:`merge_lora` folds the adapters into the
base weights and removes them: the model directory a run writes holds plain weights and loads
without peft.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mmfuse.freezing import KNOWN_COMPONENTS, components, parse_component_tree

log = logging.getLogger(__name__)

_COMPONENT_KEYS = {"r", "alpha", "dropout", "target_modules", "trainable"}
_DEFAULT_TARGETS = "all-linear"


def lora_target(model: nn.Module, component: str) -> nn.Module:
    """The part of ``component`` that gets adapters: the decoder, or an encoder's backbone.

    Raises:
        ValueError: naming the component when the model has no such part.
    """
    if component == "decoder":
        return model.decoder
    if component.startswith("encoders."):
        name = component.split(".", 1)[1]
        if name in model.encoders:
            return model.encoders[name].backbone
    raise ValueError(
        f"lora.components.{component}: not a part of the model (decoder or encoders.<name> "
        f"with encoders {sorted(model.encoders)})"
    )


def parse_lora_config(config: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{component: {r, alpha, dropout, target_modules, trainable}}`` from the ``lora`` config,
    component settings falling back to the top-level ``r``, ``alpha`` and ``dropout``."""
    if not config:
        return {}
    unknown = set(config) - {"r", "alpha", "dropout", "components"}
    if unknown:
        raise ValueError(f"lora: unknown keys {sorted(unknown)}")
    defaults = {
        "r": config.get("r", 8),
        "alpha": config.get("alpha", 16),
        "dropout": config.get("dropout", 0.0),
        "target_modules": _DEFAULT_TARGETS,
        "trainable": [],
    }
    tree = parse_component_tree(config.get("components"), lambda v: bool(set(v) & _COMPONENT_KEYS))
    parsed = {}
    for component, value in tree.items():
        if value is True:
            value = {}
        if not isinstance(value, Mapping):
            raise ValueError(
                f"lora.components.{component}: expected true or settings, got {value!r}"
            )
        extra = set(value) - _COMPONENT_KEYS
        if extra:
            raise ValueError(f"lora.components.{component}: unknown keys {sorted(extra)}")
        parsed[component] = {**defaults, **value}
    return parsed


def apply_lora(model: nn.Module, config: Mapping[str, Any] | None) -> list[str]:
    """Injects LoRA adapters into the components the ``lora`` config names.

    A known component the model does not have (``encoders.text`` without a prompt encoder)
    is skipped with a warning, so presets compose with any model.

    Returns:
        The components that got adapters.

    Raises:
        ValueError: naming the component, when it does not exist, its targets match no
            module, or a ``trainable`` regex matches no parameter.
    """
    adapted = []
    for component, spec in parse_lora_config(config).items():
        if component in KNOWN_COMPONENTS and component not in components(model):
            log.warning("lora.components.%s: the model has no such component; skipped", component)
            continue
        target = lora_target(model, component)
        before = {id(p): (name, p.requires_grad) for name, p in target.named_parameters()}
        trainable = [re.compile(regex) for regex in spec["trainable"]]
        for regex in trainable:
            if not any(regex.fullmatch(name) for name, _ in before.values()):
                raise ValueError(
                    f"lora.components.{component}.trainable: {regex.pattern!r} matches no parameter"
                )
        targets = spec["target_modules"]
        lora_config = LoraConfig(
            r=int(spec["r"]),
            lora_alpha=float(spec["alpha"]),
            lora_dropout=float(spec["dropout"]),
            target_modules=targets if isinstance(targets, str) else list(targets),
            bias="none",
        )
        try:
            inject_adapter_in_model(lora_config, target)
        except ValueError as err:
            raise ValueError(f"lora.components.{component}: {err}") from err
        if hasattr(target, "peft_config"):  # left by the tuner; nothing reads it
            del target.peft_config
        adapters = 0
        for param in target.parameters():
            if id(param) not in before:  # created by peft: an adapter weight
                param.requires_grad_(True)
                adapters += param.numel()
                continue
            name, was_trainable = before[id(param)]
            keep = was_trainable and any(regex.fullmatch(name) for regex in trainable)
            param.requires_grad_(keep)
        log.info("lora.%s: %d adapter parameters (r=%s)", component, adapters, spec["r"])
        adapted.append(component)
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Folds every LoRA adapter in ``model`` into its base layer and puts the plain base
    layer back in its place (``W + alpha/r * B A``).

    Returns:
        How many layers were merged (0 for a model without adapters).
    """
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    ]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(layers)


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA adapters."""
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())
