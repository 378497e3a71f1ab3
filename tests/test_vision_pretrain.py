"""Stage 0: captioning pretraining of the vision encoder (CaptionHead + pretrain_vision)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mmfuse.modules.caption_head import CaptionHead
from mmfuse.train import train
from mmfuse.vision_pretrain import image_text_pairs, pretrain_vision
from tests.conftest import tiny_train_overrides
from tests.helpers import build_tiny, record


def test_image_text_pairs_keep_image_records_with_their_whole_conversation(tmp_path: Path):
    image_only = record("a", "Describe the image.", "a red circle", image="img.png")
    image_only["messages"] += [
        {"role": "user", "content": [{"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "one"}]},
    ]
    audio_only = record("b", "Describe the sound.", "one beep", audio="a.wav")
    pairs = image_text_pairs([image_only, audio_only], tmp_path)
    assert pairs == [(tmp_path / "img.png", "Describe the image. a red circle How many? one")]


def test_caption_head_is_causal_and_reads_only_valid_tokens() -> None:
    torch.manual_seed(0)
    head = CaptionHead(vocab_size=50, d_model=16, num_layers=2, num_heads=2, max_length=12)
    tokens, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    ids = torch.randint(0, 50, (2, 7))
    logits = head(tokens, mask, ids)
    assert logits.shape == (2, 7, 50)
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] + 1) % 50
    assert torch.allclose(head(tokens, mask, later)[:, :4], logits[:, :4], atol=1e-6)
    masked = tokens.clone()
    masked[0, 3:] += 100.0  # masked-out tokens of row 0 change; row 0 must not
    assert torch.allclose(head(masked, mask, ids)[0], logits[0], atol=1e-5)
    assert not torch.allclose(head(tokens + 1.0, mask, ids)[1], logits[1], atol=1e-3)


def test_pretraining_lowers_the_caption_loss_and_changes_the_encoder(
    world_dir: Path, tmp_path: Path
) -> None:
    proc, model, _ = build_tiny(tmp_path)
    encoder = model.encoders["image"]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.manual_seed(0)
    first = pretrain_vision(encoder, proc, world_dir / "train.jsonl", steps=1, batch_size=16)
    torch.manual_seed(0)
    proc, model, _ = build_tiny(tmp_path)
    encoder = model.encoders["image"]
    last = pretrain_vision(encoder, proc, world_dir / "train.jsonl", steps=40, batch_size=16)
    assert last < first - 0.5, (first, last)
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed) and "proj.weight" in changed


def test_train_runs_stage_zero_then_keeps_the_frozen_encoder(
    world_dir: Path, tmp_path: Path, compose_train
) -> None:
    overrides = tiny_train_overrides(world_dir, tmp_path)
    cfg = compose_train(
        [
            *overrides,
            "vision_pretrain={steps:5,batch_size:8}",
            "freeze.encoders.image=true",
            "logger=none",
        ]
    )
    train(cfg)
    saved = load_file(tmp_path / "model" / "model.safetensors")
    _, fresh, _ = build_tiny(tmp_path / "fresh", seed=cfg.seed)
    # the saved encoder is the pretrained one (not the initial weights) ...
    proj = saved["encoders.image.proj.weight"]
    assert not torch.equal(proj, fresh.encoders["image"].proj.weight.detach())
