"""``nn.Linear`` whose large products run on oneDNN when no gradient is needed.

PyTorch computes an fp32 ``nn.Linear`` on the CPU with MKL's sgemm. On AMD CPUs MKL takes
a generic AVX2 path even where the CPU has AVX-512, while oneDNN (shipped in the same
PyTorch build, and already used for its convolutions) dispatches on the instruction set. On
the AMD EPYC of our machines (AVX-512, one thread) MKL reaches about 106 GFLOP/s on the
products of a prefill of 8 prompts and oneDNN 190-250 (``benchmarks/onednn_linear.py``).

oneDNN's fixed cost per call is higher, so small products (a decoding step's few rows, most
of one short prompt's) stay on ``F.linear``: oneDNN wins from about 2^20 multiply-adds per
thread on these shapes, and from 2^21 a prefill of one prompt is never slower. The oneDNN op
has no backward, so only calls without autograd take it (inference, the validation loop,
frozen encoders); a call under autograd computes exactly what ``nn.Linear`` computes. (A
backward on oneDNN made a training step's products 1.16 times faster on repeated batches but
training 10-20% slower: every new batch shape builds oneDNN kernels, 1-3 ms each, and
training shapes rarely repeat.) Under ``torch.compile`` the layers are plain ``F.linear``
calls: inductor lowers the oneDNN op only for frozen, prepacked weights, and does its own
CPU fusions. Results differ from MKL's by float rounding only (another summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_MACS_PER_THREAD = 2 << 20  # multiply-adds; below, F.linear (measured with 1 and 2 threads)


def _onednn_linear_op():
    """``torch.ops.mkldnn._linear_pointwise`` where this build has it (x86 builds with
    oneDNN), else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_LINEAR_POINTWISE = _onednn_linear_op()


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that sends large fp32 CPU products
    computed without autograd to oneDNN. Models get it through :func:`use_onednn_linears`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            _LINEAR_POINTWISE is not None
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # inductor lowers the op for frozen weights only
            and x.is_cpu
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.numel() * self.out_features >= MIN_MACS_PER_THREAD * torch.get_num_threads()
        ):
            return _LINEAR_POINTWISE(x, weight, self.bias, "none", [], "")
        return F.linear(x, weight, self.bias)


def use_onednn_linears(module: nn.Module, enabled: bool = True) -> int:
    """Turns every plain ``nn.Linear`` in ``module`` into a :class:`OneDNNLinear` in place
    (or, with ``enabled=False``, back); parameters, names and hooks stay as they are.
    Subclasses of ``nn.Linear`` (adapters, quantized layers) are left alone. Returns how
    many layers changed."""
    source, target = (nn.Linear, OneDNNLinear) if enabled else (OneDNNLinear, nn.Linear)
    changed = 0
    for layer in module.modules():
        if type(layer) is source:
            layer.__class__ = target
            changed += 1
    return changed
