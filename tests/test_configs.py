"""Every config option composes; the presets build; bad keys fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mmfuse.freezing import apply_freezing
from mmfuse.init_parts import load_parts
from mmfuse.model_dir import build_processor_and_model, save_model_dir

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_option_composes(trainer: str, compose_train, tmp_path: Path) -> None:
    cfg = compose_train([f"trainer={trainer}", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    expected = "cpu" if trainer in ("cpu", "ddp_cpu") else "gpu"
    assert cfg.trainer.accelerator == expected
    if trainer.startswith("ddp"):
        assert cfg.trainer.strategy.find_unused_parameters is False
    if trainer in ("cpu", "ddp_cpu"):
        built = instantiate(cfg.trainer, logger=False, callbacks=[])
        assert built.num_devices == (2 if trainer == "ddp_cpu" else 1)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny"],
        ["model=tiny", "model/text=bert_tiny"],
        ["model=tiny", "model/text=bag_of_words", "model.fusion.prompt=add"],
        ["model=tiny", "model/decoder=gpt2_tiny"],
        ["model=tiny", "~model/vision"],
        ["model=small"],
    ],
)
def test_model_presets_build(overrides: list[str], compose_train, tmp_path: Path) -> None:
    cfg = compose_train([*overrides, f"paths.output_dir={tmp_path}"])
    processor, model = build_processor_and_model(cfg)
    expected = {"image", "audio"} - ({"image"} if "~model/vision" in overrides else set())
    if any(o.startswith("model/text=") for o in overrides):
        expected.add("text")
    assert set(model.encoders) == expected
    assert model.decoder.config.vocab_size == len(processor.tokenizer)


def test_unknown_config_key_is_a_clear_error(compose_train) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["trainer.no_such_key=1"])
    assert "no_such_key" in str(err.value.__cause__ or err.value)


def test_mismatched_image_size_names_the_key(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(["model=tiny", "processor.image.size=32", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="processor.image.size=32"):
        build_processor_and_model(cfg)


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory of the demo's architecture (untrained): the sweep's encoder source."""
    from hydra import compose, initialize_config_dir

    from mmfuse.config import CONFIG_DIR

    out = tmp_path_factory.mktemp("demo")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", f"paths.output_dir={out}"])
    _, model = build_processor_and_model(cfg)
    return save_model_dir(model, cfg, out / "model")


@pytest.mark.parametrize("conditioning", ["prefix", "gated_xattn"])
@pytest.mark.parametrize("fusion", ["cross_attention", "perceiver", "qformer", "concat"])
def test_world_sweep_builds_every_variant_on_the_demo_encoders(
    fusion: str, conditioning: str, compose_train, tmp_path: Path, demo_model_dir: Path
) -> None:
    """``experiment=world_sweep`` gives every fusion the same prompt path (a bag-of-words
    encoder whose summed vectors the fusion adds: ``model.fusion.prompt=add``) and the same
    start: the demo model's encoders (``init_parts``), frozen but for their projections,
    features cached. The demo's encoder sizes and preprocessing must stay the sweep's."""
    cfg = compose_train(
        [
            "experiment=world_sweep",
            f"model/fusion={fusion}",
            f"model/conditioning={conditioning}",
            f"paths.output_dir={tmp_path}",
            f"init_parts.from={demo_model_dir}",
        ]
    )
    processor, model = build_processor_and_model(cfg)
    assert type(model.encoders["text"]).__name__ == "BagOfWordsEncoder"
    assert getattr(model.fusion, "prompt_mode", "add") == "add"
    assert type(model.conditioning).__name__ == (
        "PrefixConditioning" if conditioning == "prefix" else "GatedCrossAttentionConditioning"
    )
    assert load_parts(model, processor, cfg.init_parts["from"], list(cfg.init_parts.parts)) > 0
    frozen = apply_freezing(model, OmegaConf.to_container(cfg.freeze))
    assert sorted(frozen) == []  # the projections of both encoders train
    for name, param in model.named_parameters():
        backbone = name.startswith(("encoders.image.backbone.", "encoders.audio.backbone."))
        assert param.requires_grad != backbone, name
    assert cfg.data.cache_features
