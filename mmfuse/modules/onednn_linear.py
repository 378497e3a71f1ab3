"""``nn.Linear`` whose large fp32 products run on oneDNN.

PyTorch computes an fp32 ``nn.Linear`` on the CPU with MKL's sgemm. On AMD CPUs MKL takes
a generic AVX2 path even where the CPU has AVX-512, while oneDNN (shipped in the same
PyTorch build, and already used for its convolutions) dispatches on the instruction set. On
the AMD EPYC of our machines (AVX-512, one thread) MKL reaches about 106 GFLOP/s on the
products of a prefill of 8 prompts and oneDNN 190-250 (``benchmarks/onednn_linear.py``).

oneDNN's fixed cost per call is higher, so small products (a decoding step's few rows, most
of one short prompt's) stay on ``F.linear``: oneDNN wins from about 2^20 multiply-adds per
thread on these shapes, and from 2^21 a prefill of one prompt is never slower. Under
autograd the large products go through :class:`OneDNNLinearFunction`, whose backward computes
the input's and the weight's gradients on oneDNN too (the three products of a training
step's layer have the same size). Results differ from MKL's by float rounding only (another
summation order). Under ``torch.compile`` the layers are plain ``F.linear`` calls: inductor
lowers the oneDNN op only for frozen, prepacked weights, and does its own CPU fusions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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


class OneDNNLinearFunction(torch.autograd.Function):
    """x (N, in) @ weight.T (in, out) + bias -> (N, out) on oneDNN, and its backward:
    grad_x = grad @ weight, grad_weight = grad.T @ x, grad_bias = grad summed over rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _LINEAR_POINTWISE(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _LINEAR_POINTWISE(grad, weight.t(), None, "none", [], "")  # (N, in)
        if ctx.needs_input_grad[1]:
            grad_weight = _LINEAR_POINTWISE(grad.t(), x.t(), None, "none", [], "")  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that sends large fp32 CPU products to
    oneDNN. Models get it through :func:`use_onednn_linears`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not (
            _LINEAR_POINTWISE is not None
            and not torch.compiler.is_compiling()  # inductor lowers the op for frozen weights only
            and x.is_cpu
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.numel() * self.out_features >= MIN_MACS_PER_THREAD * torch.get_num_threads()
        ):
            return F.linear(x, weight, self.bias)
        if not torch.is_grad_enabled():
            return _LINEAR_POINTWISE(x, weight, self.bias, "none", [], "")
        rows = x.reshape(-1, x.shape[-1])  # (N, in): the Function's output is not a view
        out = OneDNNLinearFunction.apply(rows, weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


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
