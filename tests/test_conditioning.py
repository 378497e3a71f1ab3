"""Tests of mmfuse.modules.conditioning: the prefix spliced at the media placeholder and
Flamingo's gated cross-attention on GPT-2, LLaMA and Qwen2, in training and generation."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, collate, mixed_records
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

from mmfuse.beam_search import beam_search
from mmfuse.export import DECODER, WEIGHTS, export, load_export
from mmfuse.generation import GenerationConfig, generate
from mmfuse.loss import next_token_loss
from mmfuse.model_dir import save_model_dir
from mmfuse.modules.conditioning import (
    GatedCrossAttentionConditioning,
    TextInputs,
    attended_positions,
    conditioned,
    decoder_layers,
    splice_memory,
)
from mmfuse.processing.text import AUDIO_TOKEN, IGNORE_INDEX, IMAGE_TOKEN
from mmfuse.types import Memory

pytestmark = pytest.mark.usefixtures("one_torch_thread")

M = 8  # conf/model/tiny.yaml: fusion.num_queries
CONDITIONINGS = ["prefix", "gated_xattn"]


def _tiny(tmp_path, conditioning: str, *overrides: str, gates: float | None = 0.5):
    """The tiny model with ``conditioning``; cross-attention gates set to ``gates``."""
    proc, model, _ = build_tiny(
        tmp_path, overrides=[f"model/conditioning={conditioning}", *overrides]
    )
    if conditioning == "gated_xattn" and gates is not None:
        with torch.no_grad():
            for block in model.conditioning.blocks:
                block.attn_gate.fill_(gates)
                block.ff_gate.fill_(gates)
    return proc, model


def _snapshot(module: torch.nn.Module) -> dict[str, tuple]:
    """Per submodule: its attribute names and hook counts."""
    return {
        name: (
            sorted(vars(m)),
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
            len(m._forward_pre_hooks_with_kwargs),
        )
        for name, m in module.named_modules()
    }


# ----------------------------------------------------------------------------- bare LMs

VOCAB = 40


def _lm(arch: str):
    torch.manual_seed(0)
    ids = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1}
    layers = {"num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64}
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids)
    elif arch == "llama":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_key_value_heads=2, **layers, **ids
        )
    else:
        config = Qwen2Config(
            hidden_size=32, intermediate_size=64, num_key_value_heads=1, **layers, **ids
        )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_gated_xattn_starts_as_the_bare_lm_and_learns(arch):
    lm = _lm(arch)
    assert len(decoder_layers(lm)) == 2
    torch.manual_seed(1)
    lengths = [7, 4, 5]  # left-padded
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, VOCAB, (n,))
        mask[row, -n:] = 1
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": attended_positions(mask)}
    memory = Memory(torch.randn(3, 5, 16), torch.tensor([[1, 1, 1, 0, 0]] * 3).bool())
    xattn = GatedCrossAttentionConditioning(16, lm_hidden=32, lm_layers=2, every=1, num_heads=2)
    assert xattn.layers == (0, 1)
    before = _snapshot(lm)
    with torch.no_grad():
        bare = lm(**kwargs).logits
        with conditioned(lm, xattn(memory)):
            gated = lm(**kwargs).logits
    assert torch.equal(gated, bare)  # both gates at 0: exactly the bare LM

    optimizer = torch.optim.AdamW(xattn.parameters(), lr=1e-2)
    with conditioned(lm, xattn(memory)):
        logits = lm(**kwargs).logits
    targets = torch.randint(0, VOCAB, ids.shape).masked_fill(mask == 0, IGNORE_INDEX)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    optimizer.step()
    gates = [g for block in xattn.blocks for g in (block.attn_gate, block.ff_gate)]
    assert all(float(g.detach().abs()) > 0 for g in gates)
    with torch.no_grad():
        with conditioned(lm, xattn(memory)):
            after = lm(**kwargs).logits
        again = lm(**kwargs).logits
    assert not torch.allclose(after, bare, atol=1e-4)
    assert torch.equal(again, bare)  # outside the scope: the bare LM, no hook left
    assert _snapshot(lm) == before
    assert set(lm.state_dict()) == set(_lm(arch).state_dict())


def test_every_selects_the_layers():
    xattn = GatedCrossAttentionConditioning(16, lm_hidden=32, lm_layers=8, every=4, num_heads=2)
    assert xattn.layers == (3, 7) and len(xattn.blocks) == 2
    with pytest.raises(ValueError, match="model.conditioning.every"):
        GatedCrossAttentionConditioning(16, lm_hidden=32, lm_layers=2, every=3)
    with pytest.raises(ValueError, match="num_heads"):
        GatedCrossAttentionConditioning(16, lm_hidden=32, lm_layers=2, num_heads=5)


# ----------------------------------------------------------------------------- prefix splice


def test_splice_memory_layout():
    """Rows: image+audio placeholders, text-only (memory masked), placeholder-free media."""
    img, aud, pad = 90, 91, 0
    ids = torch.tensor([[5, img, aud, 6, 7, pad], [5, 6, 7, pad, pad, pad], [5, 6, 7, 8, pad, pad]])
    mask = (ids != pad).long()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[[0, 1, 2], [4, 2, 3]] = 33  # the last token of every row is supervised
    h, m = 2, 3
    embeds = ids[..., None].float().expand(-1, -1, h)  # (B, T, H): a token's embedding is its id
    prefix = -torch.arange(1.0, m + 1)[None, :, None].expand(3, m, h)  # -1, -2, -3
    text = TextInputs(
        embeds,
        mask,
        labels,
        placeholder=(ids == img) | (ids == aud),
        has_memory=torch.tensor([True, False, True]),
    )
    out = splice_memory(text, prefix, torch.ones(3, m, dtype=torch.long))
    assert out.embeds.shape == (3, 6 + m, h) and out.memory is None
    kept = [out.embeds[r, out.attention_mask[r].bool(), 0].tolist() for r in range(3)]
    assert kept == [[5, -1, -2, -3, 6, 7], [5, 6, 7], [-1, -2, -3, 5, 6, 7, 8]]
    # attended entries at the end, positions count only them
    for r, row in enumerate(kept):
        n = len(row)
        assert out.attention_mask[r, -n:].all() and not out.attention_mask[r, :-n].any()
        assert out.position_ids[r, -n:].tolist() == list(range(n))
    # the slots say where every token and memory token went
    rows = torch.arange(3)[:, None]
    assert torch.equal(out.embeds[rows, out.token_slots], embeds)
    assert torch.equal(out.embeds[rows, out.memory_slots], prefix)
    assert torch.equal(out.labels[rows, out.token_slots], labels)
    assert (out.labels[rows, out.memory_slots] == IGNORE_INDEX).all()
    assert (out.labels[:, -1] == 33).all() and (out.labels == 33).sum() == 3
    assert out.attention_mask[1].sum() == 3  # text-only: memory masked
    assert out.attention_mask[0, out.token_slots[0, 1:3]].tolist() == [0, 0]  # placeholders


def test_prefix_goes_exactly_at_the_placeholder(tmp_path, media):
    proc, model = _tiny(tmp_path, "prefix")
    model.eval()
    batch = collate(proc, mixed_records(), media)  # right-padded
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
        prefix, _ = model.conditioning(model.encode(batch))
    img, aud = proc.tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, AUDIO_TOKEN])
    for row in (1, 2, 3):  # image, audio, both
        ids = batch.input_ids[row].tolist()
        at = min(ids.index(t) for t in (img, aud) if t in ids)  # the first placeholder
        slots = inputs.memory_slots[row]
        assert slots.tolist() == list(range(int(slots[0]), int(slots[0]) + M))
        torch.testing.assert_close(inputs.embeds[row, slots], prefix[row])
        assert inputs.position_ids[row, slots].tolist() == list(range(at, at + M))
        assert int(inputs.token_slots[row, at - 1]) == int(slots[0]) - 1  # the token before
        assert inputs.attention_mask[row, inputs.token_slots[row, at]] == 0  # replaced
        following = at + 1 if ids[at + 1] not in (img, aud) else at + 2
        assert int(inputs.token_slots[row, following]) == int(slots[-1]) + 1
        assert int(inputs.position_ids[row, inputs.token_slots[row, following]]) == at + M
    both = batch.input_ids[3].tolist()
    second = inputs.token_slots[3, both.index(aud)]
    assert inputs.attention_mask[3, second] == 0  # the second placeholder is removed
    assert inputs.attention_mask[0, inputs.memory_slots[0]].sum() == 0  # text only


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_left_and_right_padding_give_the_same_logits(tmp_path, media, conditioning):
    proc, model = _tiny(tmp_path, conditioning)
    model.eval()
    right = collate(proc, mixed_records(), media, side="right")
    left = collate(proc, mixed_records(), media, side="left")
    with torch.no_grad():
        right_in, left_in = model.prepare_inputs(right), model.prepare_inputs(left)
        right_logits, right_labels = model(right)
        left_logits, left_labels = model(left)
    rows = torch.arange(len(right))[:, None]
    real = right.attention_mask.bool()  # token by token: (B, T)
    for name in ("position_ids", "labels"):
        r = getattr(right_in, name)[rows, right_in.token_slots]
        l_ = getattr(left_in, name)[rows, left_in.token_slots]
        assert torch.equal(r[real], l_[left.attention_mask.bool()])
    r = right_logits[rows, right_in.token_slots][real]
    l_ = left_logits[rows, left_in.token_slots][left.attention_mask.bool()]
    torch.testing.assert_close(r, l_, atol=1e-4, rtol=1e-4)
    if conditioning == "prefix":  # the spliced rows are identical whatever the padding
        assert torch.equal(right_labels, left_labels)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("which", ["mixed", "text_only"])
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_every_parameter_gets_a_gradient(tmp_path, media, conditioning, which):
    proc, model = _tiny(tmp_path, conditioning, gates=None)
    records = mixed_records() if which == "mixed" else mixed_records()[:1]
    logits, labels = model(collate(proc, records, media))
    next_token_loss(logits, labels)[0].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    if conditioning == "gated_xattn":  # gates at 0: only the gates learn at first
        block = model.conditioning.blocks[0]
        assert float(block.attn_gate.grad.abs()) > 0 and float(block.ff_gate.grad.abs()) > 0


@pytest.mark.parametrize("fusion", ["cross_attention", "perceiver", "qformer", "concat"])
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_every_fusion_trains_with_each_conditioning(tmp_path, media, conditioning, fusion):
    proc, model = _tiny(tmp_path, conditioning, f"model/fusion={fusion}")
    logits, labels = model(collate(proc, mixed_records(), media))
    loss, _ = next_token_loss(logits, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gated_xattn_under_gradient_checkpointing(tmp_path, media):
    """The hooks run outside the checkpointed layer forward: the same gradients."""
    proc, model = _tiny(tmp_path, "gated_xattn")
    model.eval()  # no dropout or SpecAugment in the encoders: the same gradients twice
    model.decoder.train()  # checkpointing applies to training layers
    batch = collate(proc, mixed_records(), media)

    def grads():
        model.zero_grad()
        next_token_loss(*model(batch))[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    decoder_layers(model.decoder)[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    plain = grads()
    model.decoder.activation_checkpointing_enable()
    checkpointed = grads()
    assert len(calls) == 3  # the checkpointed layer ran again in the backward pass
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert float(plain["conditioning.blocks.0.attn.to_kv.weight"].abs().sum()) > 0


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
    ("conditioning", "decoder"),
    [("prefix", "llama_tiny"), ("gated_xattn", "llama_tiny"), ("gated_xattn", "gpt2_tiny")],
)
def test_cached_generation_equals_uncached(tmp_path, media, conditioning, decoder):
    proc, model = _tiny(tmp_path, conditioning, f"model/decoder={decoder}")
    model.eval()
    prompts = collate(proc, mixed_records(), media, side="left", for_generation=True)
    for config in (
        GenerationConfig(max_new_tokens=6),
        GenerationConfig(max_new_tokens=8, do_sample=True, temperature=5.0, seed=3),
    ):
        cached = generate(model, prompts, config, use_cache=True)
        assert cached == generate(model, prompts, config, use_cache=False)
    assert sum(len(ids) for ids in cached) > 12


def test_memory_keys_and_values_are_computed_once_per_generation(tmp_path, media):
    proc, model = _tiny(tmp_path, "gated_xattn")
    model.eval()
    prompts = collate(proc, mixed_records(), media, side="left", for_generation=True)
    projections, block_calls = [], []
    for block in model.conditioning.blocks:
        block.attn.to_kv.register_forward_hook(lambda *_: projections.append(1))
        block.register_forward_hook(lambda *_: block_calls.append(1))
    blocks = len(model.conditioning.blocks)
    for config, use_cache in [
        (GenerationConfig(max_new_tokens=6), True),
        (GenerationConfig(max_new_tokens=6), False),
        (GenerationConfig(max_new_tokens=6, num_beams=3), True),
    ]:
        projections.clear(), block_calls.clear()
        generate(model, prompts, config, use_cache=use_cache)
        assert len(projections) == blocks  # once per block for the whole generation
        assert len(block_calls) >= 2 * blocks  # the blocks run at every decoder step


def test_no_media_is_left_on_the_decoder(tmp_path, media):
    proc, model = _tiny(tmp_path, "gated_xattn")
    model.eval()
    before = _snapshot(model.decoder)
    batch = collate(proc, mixed_records(), media)
    prompts = collate(proc, mixed_records(), media, side="left", for_generation=True)
    with torch.no_grad():
        model(batch)
    generate(model, prompts, GenerationConfig(max_new_tokens=3))
    beam_search(model, prompts, GenerationConfig(max_new_tokens=3, num_beams=2))
    inputs = model.prepare_inputs(prompts)
    with pytest.raises(RuntimeError, match="inside the scope"):
        with conditioned(model.decoder, inputs.memory) as scope:
            assert scope.memory is inputs.memory
            raise RuntimeError("inside the scope")
    assert scope.memory is None
    assert _snapshot(model.decoder) == before
    for module in model.decoder.modules():
        assert not module._forward_pre_hooks and not module._forward_pre_hooks_with_kwargs
        assert not any(isinstance(v, torch.Tensor) for v in vars(module).values())


def test_export_writes_a_plain_decoder_and_the_blocks_beside_it(tmp_path, media):
    """mmfuse-export: the decoder alone as a transformers model, the blocks among the other
    weights (``conditioning.blocks.*``), and the whole model back with the same logits."""
    proc, model, cfg = build_tiny(tmp_path / "run", overrides=["model/conditioning=gated_xattn"])
    with torch.no_grad():
        for param in model.conditioning.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # gates away from 0, as after training
    batch = collate(proc, mixed_records(), media)
    with torch.no_grad():
        logits = model.eval()(batch)[0]
        lm_logits = model.decoder(batch.input_ids).logits
    out = export(save_model_dir(model, cfg, tmp_path / "model"), tmp_path / "export")
    decoder = AutoModelForCausalLM.from_pretrained(str(out / DECODER)).eval()
    assert type(decoder) is type(model.decoder)
    assert set(decoder.state_dict()) == set(model.decoder.state_dict())
    weights = load_file(str(out / WEIGHTS))
    assert "conditioning.blocks.0.attn_gate" in weights
    loaded, _ = load_export(out)
    with torch.no_grad():
        torch.testing.assert_close(decoder(batch.input_ids).logits, lm_logits)
        torch.testing.assert_close(loaded(batch)[0], logits)
        assert not torch.allclose(loaded(batch)[0], lm_logits, atol=1e-3)
