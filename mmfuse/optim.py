"""Optimiser parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

_NO_DECAY_NAME = re.compile(
    r"(pos_embed|cls_token|type_embed|null_token|queries|embeddings?\b|original0)"
)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: Mapping[str, float] | None = None,
    lr: float | None = None,
) -> list[dict]:
    """Splits trainable parameters into decayed and non-decayed groups.

    No weight decay on biases, norms, embeddings (token, position, type, learned queries)
    and any parameter with fewer than two dimensions.

    Args:
        model: the model whose trainable parameters are grouped.
        weight_decay: decay of the decayed groups.
        lr_scale: ``{parameter-name prefix: multiplier}``, e.g. ``{"encoders.image": 3.0}``;
            the parameters under a prefix (the longest one that matches) get groups of
            their own with learning rate ``lr * multiplier``.
        lr: the optimiser's learning rate; needed with ``lr_scale``.

    Returns:
        ``[decay, no_decay]`` for the unscaled parameters, then a decay and a no-decay group
        for each prefix of ``lr_scale``.
    """
    lr_scale = dict(lr_scale or {})
    if lr_scale and lr is None:
        raise ValueError("lr_scale needs the optimiser's lr")
    prefixes = sorted(lr_scale, key=len, reverse=True)
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "Norm" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    buckets: dict[str | None, tuple[list, list]] = {None: ([], [])}
    buckets.update({prefix: ([], []) for prefix in lr_scale})
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((p for p in prefixes if name == p or name.startswith(p + ".")), None)
        decay, no_decay = buckets[prefix]
        if id(param) in no_decay_ids or param.ndim < 2 or _NO_DECAY_NAME.search(name):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    for prefix, (decay, no_decay) in buckets.items():
        if prefix is not None and not decay and not no_decay:
            raise ValueError(f"lr_scale: no trainable parameter under {prefix!r}")
        extra = {} if prefix is None else {"lr": lr * lr_scale[prefix]}
        groups.append({"params": decay, "weight_decay": weight_decay, **extra})
        groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (step k gets (k+1)/warmup of the peak), then cosine decay.

    The decay ends at ``min_lr_ratio`` of the peak.

    ``warmup_steps`` wins over ``warmup_ratio`` (a fraction of ``total_steps``) when set.
    """
    warmup = warmup_steps or int(warmup_ratio * total_steps)
    total = max(total_steps, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
