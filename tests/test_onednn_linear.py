"""mmfuse.modules.onednn_linear: large products without autograd go to oneDNN, the rest to
F.linear, with the same parameters and results up to float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.modules import onednn_linear
from mmfuse.modules.onednn_linear import OneDNNLinear, use_onednn_linears
from tests.helpers import build_tiny, torch_threads

HAS_ONEDNN = onednn_linear._LINEAR_POINTWISE is not None


class Spy:
    """Stands in for the oneDNN op, counting calls and computing what it computes."""

    def __init__(self, op) -> None:
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    if not HAS_ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN linear op")
    spy = Spy(onednn_linear._LINEAR_POINTWISE)
    monkeypatch.setattr(onednn_linear, "_LINEAR_POINTWISE", spy)
    return spy


def layer(inputs: int, outputs: int, bias: bool = True) -> OneDNNLinear:
    torch.manual_seed(0)
    linear = nn.Linear(inputs, outputs, bias=bias)
    use_onednn_linears(linear)
    return linear


def big_input(rows: int = 512, width: int = 128) -> torch.Tensor:
    """(4, rows / 4, width): 512 x 128 x 128 multiply-adds is above the threshold."""
    return torch.randn(4, rows // 4, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bias", [True, False])
def test_a_large_product_without_autograd_runs_on_onednn_with_the_same_result(spy, bias):
    linear, x = layer(128, 128, bias), big_input()
    with torch_threads(1), torch.inference_mode():
        out = linear(x)
    assert spy.calls == 1
    assert out.shape == (4, 128, 128)
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_a_transposed_input_gives_the_same_result(spy):
    linear = layer(128, 128)
    x = big_input().transpose(0, 1)  # not contiguous
    with torch_threads(1), torch.no_grad():
        out = linear(x)
    assert spy.calls == 1
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_small_products_and_autograd_stay_on_f_linear_exactly(spy):
    linear = layer(128, 128)
    small = torch.randn(8, 128)  # a decoding step's rows
    with torch_threads(1), torch.inference_mode():
        assert torch.equal(linear(small), F.linear(small, linear.weight, linear.bias))
    x = big_input().requires_grad_()
    with torch_threads(1):
        out = linear(x)  # a training step: gradients flow through F.linear
        out.sum().backward()
    assert spy.calls == 0
    assert torch.equal(out, F.linear(x, linear.weight, linear.bias))
    torch.testing.assert_close(x.grad, linear.weight.sum(0).detach().expand_as(x))


def test_the_threshold_grows_with_the_threads(spy):
    linear = layer(128, 128)
    x = torch.randn(160, 128)  # 160 x 128 x 128 = 2.6 M multiply-adds: one thread's worth
    with torch.inference_mode():
        with torch_threads(1):
            linear(x)
        assert spy.calls == 1
        with torch_threads(2):
            linear(x)
        assert spy.calls == 1


def test_other_dtypes_and_builds_without_the_op_use_f_linear(spy, monkeypatch):
    linear = layer(128, 128).double()
    x = big_input().double()
    with torch_threads(1), torch.inference_mode():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    assert spy.calls == 0
    monkeypatch.setattr(onednn_linear, "_LINEAR_POINTWISE", None)
    linear, x = layer(128, 128), big_input()
    with torch_threads(1), torch.inference_mode():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


class Adapter(nn.Linear):
    """A subclass of nn.Linear (as adapters and quantized layers are): left alone."""


def test_use_onednn_linears_switches_plain_linears_in_place_and_back():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Adapter(8, 8), nn.Sequential(nn.Linear(8, 2)))
    params = {name: p for name, p in net.named_parameters()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert use_onednn_linears(net) == 2
    assert [type(m) for m in (net[0], net[2], net[3][0])] == [OneDNNLinear, Adapter, OneDNNLinear]
    assert dict(net.named_parameters()) == params  # the very same parameter objects
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert use_onednn_linears(net) == 0
    assert use_onednn_linears(net, enabled=False) == 2
    assert [type(m) for m in (net[0], net[3][0])] == [nn.Linear, nn.Linear]


def test_the_model_uses_onednn_linears_unless_told_not_to(tmp_path):
    _, model, _ = build_tiny(tmp_path)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    _, plain, _ = build_tiny(tmp_path, overrides=["model.onednn_linear=false"])
    assert not any(isinstance(m, OneDNNLinear) for m in plain.modules())
    # the same weights under both: OneDNNLinear changes no parameter name
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_compiled_layers_are_plain_linears_for_inductor(spy, monkeypatch):
    """Inductor lowers the oneDNN op only for frozen, prepacked weights: under
    torch.compile the layer must trace as F.linear (a validation loop of a compiled model)."""
    linear, x = layer(128, 128), big_input()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch_threads(1), torch.inference_mode():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    assert spy.calls == 0
    monkeypatch.undo()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    use_onednn_linears(net)
    compiled = torch.compile(net)
    with torch_threads(1), torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
