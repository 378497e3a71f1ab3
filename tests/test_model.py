"""Tests of mmfuse.model.MMFuseModel built from the real tiny config."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, collate, mixed_records, record, write_media

from mmfuse.loss import next_token_loss
from mmfuse.model import MMFuseModel
from mmfuse.processing.text import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_torch_thread")

M = 8  # conf/model/tiny.yaml: fusion.num_queries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    proc, model, _ = build_tiny(tmp_path_factory.mktemp("out"))
    return proc, model.eval()


def _assert_every_parameter_has_grad(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_tiny_config_builds_the_expected_parts(tiny):
    proc, model = tiny
    assert set(model.encoders) == {"image", "audio"}
    assert model.fusion.queries.shape == (M, 32)
    assert model.decoder.config.model_type == "llama"
    assert model.decoder.config.vocab_size == len(proc.tokenizer)
    assert model.tokenizer is proc.tokenizer


def test_mixed_batch_logits_and_labels(tiny, media):
    proc, model = tiny
    batch = collate(proc, mixed_records(), media)
    assert batch.has_image.tolist() == [False, True, False, True]
    assert batch.has_audio.tolist() == [False, False, True, True]
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
        logits, labels = model(batch)
    b, t = batch.input_ids.shape
    assert logits.shape == (b, M + t, len(proc.tokenizer))
    assert torch.isfinite(logits).all()
    assert labels.shape == (b, M + t)
    assert (labels.gather(1, inputs.memory_slots) == IGNORE_INDEX).all()
    assert torch.equal(labels.gather(1, inputs.token_slots), batch.labels)
    # every supervised label follows an attended position: removed entries are at the front
    supervised = (labels[:, 1:] != IGNORE_INDEX).nonzero()
    assert inputs.attention_mask[supervised[:, 0], supervised[:, 1]].all()


def test_prepare_inputs(tiny, media):
    proc, model = tiny
    batch = collate(proc, mixed_records(), media)
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
        prefix, _ = model.conditioning(model.encode(batch))
    b, t = batch.input_ids.shape
    hidden = model.decoder.config.hidden_size
    assert inputs.embeds.shape == (b, M + t, hidden)
    assert inputs.memory is None
    token_embeds = model.decoder.get_input_embeddings()(batch.input_ids)
    rows = torch.arange(b)[:, None]
    torch.testing.assert_close(inputs.embeds[rows, inputs.token_slots], token_embeds)
    torch.testing.assert_close(inputs.embeds[rows, inputs.memory_slots], prefix)
    # the memory is read by the rows with media (1, 2, 3), masked in the text-only row 0
    memory_mask = inputs.attention_mask.gather(1, inputs.memory_slots)
    assert memory_mask.tolist() == [[0] * M] + [[1] * M] * 3
    # attended entries are contiguous at the end, with positions 0..n-1
    for row in range(b):
        n = int(inputs.attention_mask[row].sum())
        assert inputs.attention_mask[row, -n:].all() and not inputs.attention_mask[row, :-n].any()
        assert inputs.position_ids[row, -n:].tolist() == list(range(n))
    assert (inputs.labels.gather(1, inputs.memory_slots) == IGNORE_INDEX).all()


def test_left_and_right_padding_give_equal_inputs_and_logits(tiny, media):
    proc, model = tiny
    records = mixed_records()
    right = collate(proc, records, media, side="right")
    left = collate(proc, records, media, side="left")
    assert not torch.equal(right.input_ids, left.input_ids)  # rows are padded differently
    with torch.no_grad():
        right_in, left_in = model.prepare_inputs(right), model.prepare_inputs(left)
        right_logits, _ = model(right)
        left_logits, _ = model(left)
    mask = right_in.attention_mask.bool()
    assert torch.equal(mask, left_in.attention_mask.bool())
    assert torch.equal(right_in.position_ids, left_in.position_ids)
    assert torch.equal(right_in.labels, left_in.labels)
    torch.testing.assert_close(right_in.embeds[mask], left_in.embeds[mask])
    torch.testing.assert_close(right_logits[mask], left_logits[mask], atol=1e-4, rtol=1e-4)


def test_record_output_does_not_depend_on_batch(tiny, media):
    proc, model = tiny
    records = mixed_records()
    batch = collate(proc, records, media)
    single = collate(proc, records[3:], media)
    n = single.input_ids.shape[1] + M  # the longest record: no padding alone
    with torch.no_grad():
        logits, _ = model(batch)
        alone, _ = model(single)
    torch.testing.assert_close(logits[3, -n:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", [0, 1, 2])  # text only, image only, audio only
def test_a_missing_modality_without_autograd_gives_the_same_logits(tiny, media, which):
    """Without autograd an absent modality's encoder does not run (one masked token instead
    of a dummy row's): the memory and logits are those of the dummy-row path."""
    proc, model = tiny
    batch = collate(proc, mixed_records()[which : which + 1], media)
    with torch.no_grad():
        memory = model.encode(batch)
        logits, _ = model(batch)
    with torch.enable_grad():  # the training path: dummy rows
        dummy_memory = model.encode(batch)
        dummy_logits, _ = model(batch)
    assert memory.feats.shape == dummy_memory.feats.shape
    torch.testing.assert_close(memory.feats, dummy_memory.feats.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, dummy_logits.detach(), atol=1e-5, rtol=1e-5)


def test_memory_depends_on_the_image(tmp_path, tiny):
    proc, model = tiny
    write_media(tmp_path)
    records = [
        record("a", "What color?", "red", image="a.png"),
        record("b", "What color?", "blue", image="b.png"),
    ]
    batch = collate(proc, records, tmp_path)
    with torch.no_grad():
        memory = model.encode(batch)
    assert memory.feats.shape == (2, M, 32)
    assert not torch.allclose(memory.feats[0], memory.feats[1], atol=1e-5)


@pytest.mark.parametrize("which", ["mixed", "text_only"])
def test_every_trainable_parameter_gets_a_gradient(tmp_path, media, which):
    proc, model, _ = build_tiny(tmp_path)
    records = mixed_records() if which == "mixed" else mixed_records()[:1]
    batch = collate(proc, records, media)
    logits, labels = model(batch)
    loss, count = next_token_loss(logits, labels, batch.ids)
    loss.backward()
    _assert_every_parameter_has_grad(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) > 50
    if which == "text_only":  # no medium: the encoders take part with zero gradients
        for name in ("image", "audio"):
            for param in model.encoders[name].parameters():
                if param.requires_grad:
                    assert (param.grad == 0).all()


@pytest.mark.parametrize(
    "prompt_encoder",
    [["model/text=bert_tiny"], ["model/text=bag_of_words", "model.fusion.prompt=add"]],
)
def test_text_encoder_model_handles_an_empty_prompt(tmp_path, media, prompt_encoder):
    proc, model, _ = build_tiny(tmp_path, overrides=prompt_encoder)
    assert set(model.encoders) == {"image", "audio", "text"}
    records = [*mixed_records()[:2], record("blank", "", "red", image="a.png")]
    batch = collate(proc, records, media)
    assert batch.prompt_mask[2].sum() == 0 and batch.prompt_mask[1].sum() > 0
    logits, labels = model(batch)
    assert torch.isfinite(logits).all()
    next_token_loss(logits, labels)[0].backward()
    _assert_every_parameter_has_grad(model)
    assert model.encoders["text"].proj.weight.grad.abs().sum() > 0


def test_mixed_batch_trains(tmp_path, media):
    proc, model, _ = build_tiny(tmp_path, seed=0)
    batch = collate(proc, mixed_records(), media)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss, _ = next_token_loss(*model(batch))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        final, _ = next_token_loss(*model(batch))
    # starts near log(V) ~ 6.1 and falls below a third of it (observed ~1.6-1.7)
    assert losses[0] > 5.0
    assert float(final) < losses[0] / 3
    assert losses[-1] < losses[15] < losses[0]


def test_model_needs_an_encoder(tmp_path):
    _, model, _ = build_tiny(tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        MMFuseModel(model.tokenizer, 32, decoder=None, fusion=None, conditioning=None)


def test_encoder_width_must_match(tmp_path):
    with pytest.raises(Exception, match="d_model 16 != 32"):
        build_tiny(tmp_path, overrides=["model.vision.d_model=16"])


@pytest.mark.parametrize("conditioning", ["prefix", "gated_xattn"])
def test_row_groups_give_the_same_logits_loss_and_gradients(tmp_path, media, conditioning):
    proc, model, _ = build_tiny(tmp_path, overrides=[f"model/conditioning={conditioning}"])
    model.eval()  # no dropout: both runs compute the same function
    caption = "a red circle at the top left and a blue square at the bottom right, on grey"
    records = [*mixed_records(), record("long", "Describe the image.", caption, image="a.png")]
    batch = collate(proc, records, media)
    widths = []
    hook = model.decoder.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[:2]),
        with_kwargs=True,
    )
    results = {}
    for groups in (1, 3):
        model.row_groups = groups
        model.zero_grad()
        logits, labels = model(batch)
        loss, _ = next_token_loss(logits, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[groups] = logits.detach(), loss.detach(), grads
    hook.remove()
    (one, loss_one, grads_one), (grouped, loss_grouped, grads_grouped) = results[1], results[3]
    attended = model.prepare_inputs(batch).attention_mask.bool()
    torch.testing.assert_close(grouped[attended], one[attended], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_grouped, loss_one, atol=1e-6, rtol=1e-6)
    assert grads_grouped.keys() == grads_one.keys()
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_grouped[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # one padded call of 5 rows, then shorter calls that cover every row once
    (rows, width), *parts = widths
    assert rows == 5 and len(parts) > 1
    assert sum(r for r, _ in parts) == 5 and sum(r * w for r, w in parts) < rows * width


def test_row_groups_must_be_positive(tmp_path):
    with pytest.raises(Exception, match="row_groups must be at least 1"):
        build_tiny(tmp_path, overrides=["model.row_groups=0"])
