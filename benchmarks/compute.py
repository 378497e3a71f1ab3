"""Compute efficiency: the training step's FLOPs per second over the machine's fp32 matmul
FLOPs per second.

The FLOPs of one training step (forward and backward) are counted on the model by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention:
what the machine's peak is about); the optimiser's element-wise update is not counted. The
peak is a large ``torch.mm`` timed in the same run.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmfuse.loss import next_token_loss
from mmfuse.model import MMFuseModel
from mmfuse.types import Batch


def training_step_flops(model: MMFuseModel, batch: Batch) -> tuple[int, dict[str, int]]:
    """FLOPs of the forward and backward pass of one training step on ``batch`` (the
    gradients are cleared afterwards), and the forward FLOPs of each top-level component
    (``FlopCounterMode`` attributes backward operations to every module whose backward is
    under way, so only the forward split is exact)."""
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        logits, labels = model(batch)
        loss, _ = next_token_loss(logits, labels, batch.ids)
        loss.backward()
    model.zero_grad(set_to_none=True)
    forward = FlopCounterMode(display=False)
    with forward:  # with autograd on: the module tracker hooks into the graph
        model(batch)
    parts: dict[str, int] = defaultdict(int)
    for name, counts in forward.get_flop_counts().items():
        top = name.split(".")  # "MMFuseModel.decoder", "MMFuseModel.encoders.image", ...
        if (len(top) == 2 and top[1] != "encoders") or (len(top) == 3 and top[1] == "encoders"):
            parts[".".join(top[1:])] += sum(counts.values())
    return counter.get_total_flops(), dict(parts)


def peak_fraction(step_flops: float, step_seconds: float, peak_flops_per_s: float) -> float:
    """Achieved FLOP/s of training as a fraction of the measured matmul FLOP/s."""
    return step_flops / step_seconds / peak_flops_per_s


def ensure_threads(threads: int | None) -> int:
    """Sets torch's CPU threads when given; returns the number in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
