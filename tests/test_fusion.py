"""Tests of mmfuse.modules.fusion and the prefix conditioning."""

from __future__ import annotations

import pytest
import torch

from mmfuse.modules.conditioning import PrefixConditioning
from mmfuse.modules.fusion import CrossAttentionFusion
from mmfuse.types import Memory, ModalityTokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, M = 16, 4


@pytest.fixture
def fusion():
    torch.manual_seed(0)
    return CrossAttentionFusion(
        ["image", "audio"], D, num_queries=M, num_layers=2, num_heads=2, mlp_ratio=2.0
    ).eval()


def _tokens(seed: int = 1):
    torch.manual_seed(seed)
    image_mask = torch.tensor([[True] * 5, [True] * 5, [False] * 5])
    image = ModalityTokens(torch.randn(3, 5, D), image_mask)
    audio_mask = torch.zeros(3, 6, dtype=torch.bool)
    audio_mask[0, :4] = True
    audio_mask[2, :6] = True
    audio = ModalityTokens(torch.randn(3, 6, D), audio_mask)
    return {"image": image, "audio": audio}


def test_memory_shape(fusion):
    memory = fusion(_tokens())
    assert isinstance(memory, Memory)
    assert memory.feats.shape == (3, M, D)
    assert memory.mask.shape == (3, M) and memory.mask.dtype == torch.bool and memory.mask.all()
    assert torch.isfinite(memory.feats).all()
    # the rows have different media, so their memories differ
    assert not torch.allclose(memory.feats[0], memory.feats[1], atol=1e-4)


def test_masked_tokens_do_not_influence_memory(fusion):
    tokens = _tokens()
    expected = fusion(tokens).feats
    changed = {}
    for name, tok in tokens.items():
        feats = tok.feats.clone()
        feats[~tok.mask] = torch.randn(int((~tok.mask).sum()), D) * 50
        changed[name] = ModalityTokens(feats, tok.mask)
    torch.testing.assert_close(fusion(changed).feats, expected)
    # changing a real token does change the memory of its row only
    feats = tokens["audio"].feats.clone()
    feats[0, 0] += torch.randn(D)  # (a constant shift would vanish in the LayerNorm)
    out = fusion({"image": tokens["image"], "audio": ModalityTokens(feats, tokens["audio"].mask)})
    assert not torch.allclose(out.feats[0], expected[0], atol=1e-4)
    torch.testing.assert_close(out.feats[1:], expected[1:])


def test_record_without_any_token_gets_the_null_token(fusion):
    tokens = {
        "image": ModalityTokens(torch.randn(2, 5, D), torch.zeros(2, 5, dtype=torch.bool)),
        "audio": ModalityTokens(torch.randn(2, 6, D), torch.zeros(2, 6, dtype=torch.bool)),
    }
    memory = fusion(tokens)
    assert torch.isfinite(memory.feats).all()
    # nothing to tell the rows apart: both get the same memory
    torch.testing.assert_close(memory.feats[0], memory.feats[1])


def test_row_order_and_batch_independence(fusion):
    tokens = _tokens()
    full = fusion(tokens).feats
    single = fusion({k: ModalityTokens(v.feats[2:], v.mask[2:]) for k, v in tokens.items()}).feats
    torch.testing.assert_close(single[0], full[2], atol=1e-5, rtol=1e-5)


def test_wrong_modalities_raise(fusion):
    tokens = _tokens()
    with pytest.raises(ValueError, match="fusion expects"):
        fusion({"image": tokens["image"]})
    with pytest.raises(ValueError, match="fusion expects"):
        fusion({**tokens, "text": tokens["image"]})


def test_prompt_makes_the_memory_instruction_aware():
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(["image", "text"], D, num_queries=M, num_layers=1).eval()
    image = _tokens()["image"]
    prompt_mask = torch.tensor([[True, True, False]] * 3)
    prompts = torch.randn(2, 3, 3, D)
    first = fusion({"image": image, "text": ModalityTokens(prompts[0], prompt_mask)}).feats
    second = fusion({"image": image, "text": ModalityTokens(prompts[1], prompt_mask)}).feats
    # another question about the same image gives another memory, already in the first block
    assert not torch.allclose(first[0], second[0], atol=1e-4)
    padded = prompts[0].clone()
    padded[:, 2] = torch.randn(3, D) * 50  # masked prompt tokens change nothing
    same = fusion({"image": image, "text": ModalityTokens(padded, prompt_mask)}).feats
    torch.testing.assert_close(same, first)
    # a record with a prompt and no media reads the null token only: finite, no empty softmax
    no_media = ModalityTokens(image.feats, torch.zeros_like(image.mask))
    out = fusion({"image": no_media, "text": ModalityTokens(prompts[0], prompt_mask)}).feats
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["add", "both"])
def test_prompt_added_to_every_query(mode):
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(["image", "text"], D, num_queries=M, num_layers=1, prompt=mode)
    fusion.eval()
    image = _tokens()["image"]
    prompt_mask = torch.tensor([[True, True, False]] * 3)
    words = torch.randn(3, 3, D)
    out = fusion({"image": image, "text": ModalityTokens(words, prompt_mask)}).feats
    # the queries start from the sum of the real words: their order makes no difference
    # without attention to the prompt tokens; masked tokens never do
    swapped = words[:, [1, 0, 2]].clone()
    swapped[:, 2] = torch.randn(3, D) * 50
    again = fusion({"image": image, "text": ModalityTokens(swapped, prompt_mask)}).feats
    if mode == "add":
        torch.testing.assert_close(again, out)
    # a different question gives a different memory of the same image
    other = fusion({"image": image, "text": ModalityTokens(words.flip(0), prompt_mask)}).feats
    assert not torch.allclose(other[0], out[0], atol=1e-4)
    # the same computation by hand: queries + word sum, then the block without the prompt
    if mode == "add":
        q = fusion.queries + (words[0, :2] + fusion.type_embed["text"]).sum(0)
        ctx = torch.cat([fusion.null_token, image.feats[0] + fusion.type_embed["image"]])
        keep = torch.ones(1, 1 + ctx.shape[0] - 1, dtype=torch.bool)
        by_hand = fusion.norm(fusion.blocks[0](q[None], ctx[None], keep))
        torch.testing.assert_close(by_hand[0], out[0])


def test_query_std_sets_the_initial_query_size():
    torch.manual_seed(0)
    big = CrossAttentionFusion(["image"], 64, num_queries=32, query_std=1.0)
    assert 0.9 < big.queries.std().item() < 1.1
    assert CrossAttentionFusion(["image"], 64, num_queries=32).queries.std().item() < 0.03


def test_unknown_prompt_mode_raises():
    with pytest.raises(ValueError, match="fusion.prompt: 'sum' is not one of"):
        CrossAttentionFusion(["image", "text"], D, prompt="sum")


def test_every_parameter_gets_a_gradient(fusion):
    fusion.train()
    fusion(_tokens()).feats.sum().backward()
    for name, param in fusion.named_parameters():
        assert param.grad is not None, name
    assert set(fusion.type_embed) == {"image", "audio"}


def test_prefix_conditioning():
    torch.manual_seed(0)
    cond = PrefixConditioning(D, lm_hidden=24)
    memory = Memory(torch.randn(2, M, D), torch.tensor([[True] * M, [True, True, False, False]]))
    prefix, mask = cond(memory)
    assert prefix.shape == (2, M, 24)
    assert mask.dtype == torch.long and mask.tolist() == [[1] * M, [1, 1, 0, 0]]
    norm = torch.nn.functional.layer_norm(memory.feats, (D,))
    expected = cond.proj[1](norm * cond.proj[0].weight + cond.proj[0].bias)
    torch.testing.assert_close(prefix, expected)
