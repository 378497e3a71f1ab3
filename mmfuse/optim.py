"""Optimiser parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_NO_DECAY_NAME = re.compile(
    r"(pos_embed|cls_token|type_embed|null_token|queries|embeddings?\b|original0)"
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits trainable parameters into decayed and non-decayed groups.

    No weight decay on biases, norms, embeddings (token, position, type, learned queries)
    and any parameter with fewer than two dimensions.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "Norm" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in no_decay_ids or param.ndim < 2 or _NO_DECAY_NAME.search(name):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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
