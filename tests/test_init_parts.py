"""Tests of mmfuse.init_parts: chosen parts of a new model start from a model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_tiny
from safetensors.torch import load_file

from mmfuse.init_parts import load_parts
from mmfuse.model_dir import WEIGHTS, load_model_dir
from mmfuse.train import train
from tests.conftest import tiny_train_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENCODERS = ["encoders.image", "encoders.audio"]


def _of(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(f"{part}.")}


def test_named_parts_are_copied_and_the_rest_kept(trained_run: Path, tmp_path: Path) -> None:
    saved = load_file(trained_run / "model" / WEIGHTS)
    processor, model, _ = build_tiny(tmp_path, seed=7, overrides=["model/fusion=perceiver"])
    before = {k: v.clone() for k, v in model.state_dict().items()}

    copied = load_parts(model, processor, trained_run / "model", ENCODERS)

    after = model.state_dict()
    encoder_keys = [k for k in after if k.startswith(("encoders.image.", "encoders.audio."))]
    assert copied == len(encoder_keys) > 0
    for key in encoder_keys:
        assert torch.equal(after[key], saved[key]), key
    for key in after:
        if key not in encoder_keys:
            assert torch.equal(after[key], before[key]), key  # fusion, decoder: as built


def test_a_part_the_model_lacks(trained_run: Path, tmp_path: Path) -> None:
    processor, model, _ = build_tiny(tmp_path)
    with pytest.raises(ValueError, match="the model has no part 'encoders.video'"):
        load_parts(model, processor, trained_run / "model", ["encoders.video"])


def test_no_directory_or_no_parts(trained_run: Path, tmp_path: Path) -> None:
    processor, model, _ = build_tiny(tmp_path)
    with pytest.raises(ValueError, match=r"no model directory given \(init_parts.from\)"):
        load_parts(model, processor, None, ENCODERS)
    with pytest.raises(ValueError, match=r"no parts named .*\(init_parts.parts\)"):
        load_parts(model, processor, trained_run / "model", [])


def test_a_directory_that_is_no_model_directory(tmp_path: Path) -> None:
    processor, model, _ = build_tiny(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"init_parts.from: .*missing is not a model dir"):
        load_parts(model, processor, tmp_path / "missing", ENCODERS)


def test_a_weight_of_another_shape(trained_run: Path, tmp_path: Path) -> None:
    processor, model, _ = build_tiny(tmp_path, overrides=["model.d_model=48"])
    with pytest.raises(ValueError, match=r"part encoders.image: encoders.image.proj.* has shape"):
        load_parts(model, processor, trained_run / "model", ["encoders.image"])


def test_other_preprocessing_is_refused(trained_run: Path, tmp_path: Path) -> None:
    processor, model, _ = build_tiny(tmp_path, overrides=["processor.image.mean=[0.4,0.4,0.4]"])
    with pytest.raises(ValueError, match="trained on processor.image .*this run has"):
        load_parts(model, processor, trained_run / "model", ["encoders.image"])
    # so is a part that holds the image encoder, or one inside it
    for part in ("encoders", "encoders.image.backbone"):
        with pytest.raises(ValueError, match=f"{part} from .* trained on processor.image"):
            load_parts(model, processor, trained_run / "model", [part])
    # the audio encoder's inputs are unchanged: it loads
    assert load_parts(model, processor, trained_run / "model", ["encoders.audio"]) > 0


def test_a_decoder_needs_the_same_vocabulary(trained_run: Path, tmp_path: Path) -> None:
    processor, model, _ = build_tiny(tmp_path)
    processor.tokenizer.add_tokens(["<|new|>"])
    with pytest.raises(ValueError, match="decoder .* another tokenizer"):
        load_parts(model, processor, trained_run / "model", ["decoder"])


def test_training_from_loaded_frozen_encoders(
    world_dir: Path, trained_run: Path, tmp_path: Path, compose_train
) -> None:
    """`init_parts` with `freeze=encoders`: another fusion trains on the saved encoders, whose
    backbones leave the fit as they were loaded."""
    source = trained_run / "model"
    overrides = tiny_train_overrides(world_dir, tmp_path)
    cfg = compose_train(
        [
            *overrides,
            "model/fusion=qformer",
            f"init_parts={{from:{source},parts:[encoders.image,encoders.audio]}}",
            "freeze=encoders",
            "trainer.max_steps=2",
            "logger=none",
        ]
    )
    train(cfg)
    model, _ = load_model_dir(tmp_path / "model")
    saved = load_file(source / WEIGHTS)
    trained = model.state_dict()
    for part in ("encoders.image.backbone", "encoders.audio.backbone"):
        keys = _of(trained, part)
        assert keys
        for key, value in keys.items():
            assert torch.equal(value, saved[key]), key
    # the projections were loaded, then trained
    proj = "encoders.image.proj.weight"
    assert not torch.equal(trained[proj], saved[proj])
