"""Tests of mmfuse.modules.attention against a hand-written reference."""

from __future__ import annotations

import math

import pytest
import torch

from mmfuse.modules.attention import Attention, FeedForward

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_attention(attn: Attention, x, context=None, mask=None):
    """softmax(Q K^T / sqrt(d)) V per head, with masked keys at -inf."""
    context = x if context is None else context
    b, length, dim = x.shape
    heads, d = attn.num_heads, dim // attn.num_heads
    q = x @ attn.to_q.weight.T + attn.to_q.bias
    kv = context @ attn.to_kv.weight.T + attn.to_kv.bias
    k, v = kv[..., :dim], kv[..., dim:]
    out = torch.zeros(b, length, dim)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            scores = q[bi, :, sl] @ k[bi, :, sl].T / math.sqrt(d)  # (L, S)
            if mask is not None:
                scores = scores.masked_fill(~mask[bi][None, :], float("-inf"))
            out[bi, :, sl] = scores.softmax(dim=-1) @ v[bi, :, sl]
    return out @ attn.to_out.weight.T + attn.to_out.bias


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(dim=8, num_heads=2, context_dim=6).eval()


def test_cross_attention_matches_reference(attn):
    torch.manual_seed(1)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    out = attn(x, ctx)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, reference_attention(attn, x, ctx), atol=1e-5, rtol=1e-5)


def test_self_attention_matches_reference():
    torch.manual_seed(0)
    attn = Attention(dim=12, num_heads=3).eval()
    x = torch.randn(2, 4, 12)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_masked_attention_matches_reference(attn):
    torch.manual_seed(2)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, False, True, False, True], [True, True, True, True, False]])
    out = attn(x, ctx, mask)
    torch.testing.assert_close(out, reference_attention(attn, x, ctx, mask), atol=1e-5, rtol=1e-5)
    # the mask matters
    assert not torch.allclose(out, attn(x, ctx), atol=1e-3)


def test_masked_keys_get_no_weight(attn):
    torch.manual_seed(3)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, False, True, False, True], [False, True, True, True, False]])
    changed = ctx.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6) * 100
    torch.testing.assert_close(attn(x, ctx, mask), attn(x, changed, mask))
    # unmasked changes do change the output
    changed[mask] += 1.0
    assert not torch.allclose(attn(x, ctx, mask), attn(x, changed, mask), atol=1e-3)


def test_masked_keys_get_zero_gradient(attn):
    torch.manual_seed(4)
    x, ctx = torch.randn(1, 3, 8), torch.randn(1, 4, 6, requires_grad=True)
    mask = torch.tensor([[True, False, True, False]])
    attn(x, ctx, mask).sum().backward()
    assert (ctx.grad[0, [1, 3]] == 0).all()
    assert (ctx.grad[0, [0, 2]].abs().sum(dim=-1) > 0).all()


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2, dropout=0.5)
    x = torch.randn(1, 6, 8)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=1e-5, rtol=1e-5)
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="divisible"):
        Attention(dim=10, num_heads=3)


def test_feed_forward_shape():
    torch.manual_seed(0)
    ff = FeedForward(8, mlp_ratio=2.0)
    assert ff[0].out_features == 16 and ff(torch.randn(2, 3, 8)).shape == (2, 3, 8)
