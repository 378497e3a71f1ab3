"""The model directory that training writes and evaluation and chat load.

Layout: ``model.safetensors`` (weights), ``tokenizer/``, ``config.yaml`` (the resolved model
and processor configs) and, for parts that were loaded from a pretrained directory, that
part's architecture config in ``<part>_config/`` (with a Whisper encoder's feature-extractor
settings) so the directory stands on its own. A timm directory's architecture goes into the
vision config's timm arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model
from transformers import PreTrainedModel

from mmfuse.model import MMFuseModel
from mmfuse.pretrained import resolve_processor_config
from mmfuse.processing.processor import Processor

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.yaml", "tokenizer"
_AUTO_CONFIG = "transformers.AutoConfig.from_pretrained"
_HF_PARTS = {
    "decoder": "decoder",
    "vision": "encoders.image.backbone",
    "audio": "encoders.audio.backbone",
    "text": "encoders.text.backbone",
}
# timm arguments VisionEncoder sets itself
_TIMM_OWN_ARGS = {"num_classes", "global_pool", "pretrained_model_args"}


def save_model_dir(model: MMFuseModel, cfg: DictConfig, out_dir: str | Path) -> Path:
    """Writes weights, tokenizer and a self-contained config for ``model`` to ``out_dir``.

    Args:
        model: the trained model.
        cfg: the run config holding ``model`` and ``processor``.
        out_dir: target directory (created).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve_processor_config(cfg)  # the preprocessing the processor was built with
    model.tokenizer.save_pretrained(str(out / TOKENIZER))
    save_model(model, str(out / WEIGHTS))
    saved = OmegaConf.create(
        {
            "model_dir": "???",
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "processor": OmegaConf.to_container(cfg.processor, resolve=True),
        }
    )
    saved.processor.tokenizer = {
        "_target_": "mmfuse.processing.text.load_tokenizer",
        "path": "${model_dir}/" + TOKENIZER,
    }
    for key, attribute in _HF_PARTS.items():
        node = saved.model.get(key)
        # a part whose architecture lives in a directory (a pretrained model, or the
        # `<part>_config/` of a model directory this run started from) gets its own copy
        if node is None or not (node.get("pretrained") or _config_from_directory(node)):
            continue
        part = model.get_submodule(attribute)
        if not isinstance(part, PreTrainedModel):  # a timm backbone: see below
            continue
        part.config.save_pretrained(str(out / f"{key}_config"))
        node.pretrained = None
        if key in ("decoder", "text"):
            node.vocab_size = part.get_input_embeddings().num_embeddings
        node.config = {
            "_target_": _AUTO_CONFIG,
            "pretrained_model_name_or_path": "${model_dir}/" + f"{key}_config",
        }
        encoder = model.get_submodule(attribute.rpartition(".")[0])
        extractor = getattr(encoder, "feature_extractor", None)
        if key == "audio" and extractor is not None:
            extractor.save_pretrained(str(out / f"{key}_config"))
            node.feature_extractor = "${model_dir}/" + f"{key}_config"
    vision = saved.model.get("vision")
    if vision is not None and vision.get("pretrained"):
        _timm_architecture(vision)
    OmegaConf.save(saved, out / CONFIG)
    return out


def build_processor_and_model(cfg: DictConfig) -> tuple[Processor, MMFuseModel]:
    """Instantiates the processor, then the model with the processor's tokenizer.

    The processor follows the pretrained parts (``pretrained.resolve_processor_config``):
    their image and audio settings, and a pretrained decoder's tokenizer and chat template.
    """
    processor = build_processor(cfg)
    model = instantiate(cfg.model, tokenizer=processor.tokenizer, _convert_="all")
    check_compatible(model, processor)
    return processor, model


def build_processor(cfg: DictConfig) -> Processor:
    """The processor of ``cfg``, following its pretrained parts (see
    ``build_processor_and_model``)."""
    return instantiate(resolve_processor_config(cfg).processor, _convert_="all")


def check_compatible(model: MMFuseModel, processor: Processor) -> None:
    """Fails with the config key to fix when processor and encoders disagree."""
    vision = model.encoders["image"] if "image" in model.encoders else None
    if vision is not None:
        size = getattr(vision, "image_size", None) or vision.backbone.patch_embed.img_size
        expected = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if expected != (processor.image.size, processor.image.size):
            raise ValueError(
                f"processor.image.size={processor.image.size} but model.vision img_size is "
                f"{expected}"
            )


def load_model_dir(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MMFuseModel, Processor]:
    """Loads a model directory written by ``save_model_dir`` (in eval mode)."""
    processor, model = build_processor_and_model(read_model_dir_config(path))
    load_weights(model, path)
    return model.to(device).eval(), processor


def load_processor_dir(path: str | Path) -> Processor:
    """The processor of a model directory alone (no weights read): for a process that
    prepares inputs for a model running elsewhere (``mmfuse.serve.engine``)."""
    return build_processor(read_model_dir_config(path))


def read_model_dir_config(path: str | Path) -> DictConfig:
    """The ``model`` and ``processor`` configs saved in a model directory, resolved.

    Paths inside (the tokenizer, ``<part>_config/``) become absolute paths into ``path``.
    """
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a model directory (needs {CONFIG} and {WEIGHTS})")
    cfg = OmegaConf.load(path / CONFIG)
    cfg.model_dir = str(path.resolve())
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def load_weights(model: MMFuseModel, path: str | Path) -> None:
    """Loads a model directory's weights into ``model``; every key and shape must match.

    Raises:
        ValueError: naming the directory and the keys or shapes that differ.
    """
    weights = Path(path) / WEIGHTS
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except RuntimeError as err:  # size mismatches
        raise ValueError(f"{weights}: the weights do not fit the model: {err}") from err
    if missing or unexpected:
        raise ValueError(f"{weights}: missing {missing}, unexpected {unexpected}")


def _timm_architecture(node: DictConfig) -> None:
    """Replaces a timm vision config's ``pretrained`` by the architecture it names: a timm
    directory's architecture and arguments (those the config does not set itself); a weights
    file's architecture is already in the timm arguments."""
    path = Path(node.pretrained)
    node.pretrained = None
    if not path.is_dir():
        return
    saved = json.loads((path / "config.json").read_text())
    node.model_name = saved["architecture"]
    for key, value in (saved.get("model_args") or {}).items():
        if key not in _TIMM_OWN_ARGS and key not in node:
            node[key] = value


def _config_from_directory(node: DictConfig) -> bool:
    config = node.get("config")
    return isinstance(config, DictConfig) and config.get("_target_") == _AUTO_CONFIG
