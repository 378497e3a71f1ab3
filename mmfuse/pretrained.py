"""Preprocessing and tokenizer settings that follow the pretrained parts a model loads.

A pretrained directory carries the settings its weights were trained with: an HF image
processor or feature extractor in ``preprocessor_config.json`` (ViT, CLIP, wav2vec2, HuBERT,
Whisper), timm's ``pretrained_cfg`` in ``config.json``, a causal LM's tokenizer and chat
template. :func:`resolve_processor_config` writes them into the ``processor`` config, so the
processor is built to match the model (``model_dir.build_processor_and_model`` calls it). A
bare weights file (a timm state dict) carries no settings: ``processor.image`` is left as
configured.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
LOAD_TOKENIZER = "mmfuse.processing.text.load_tokenizer"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def image_settings(path: str | Path) -> dict[str, Any]:
    """``{"size", "mean", "std"}`` (those found) for the ``ImageProcessor`` of a pretrained
    vision directory.

    Reads an HF image processor (``preprocessor_config.json``: the crop size when it
    centre-crops, else the resize size; ``image_mean``, ``image_std``), else timm's
    ``pretrained_cfg`` in ``config.json`` (``input_size``, ``mean``, ``std``), else an HF
    model config's ``image_size``. Empty for a file or a directory without any of them.
    """
    path = Path(path)
    if not path.is_dir():
        return {}
    settings: dict[str, Any] = {}
    processor = _read_json(path / PREPROCESSOR_CONFIG)
    config = _read_json(path / "config.json") or {}
    if processor is not None:
        size = processor.get("crop_size") if processor.get("do_center_crop") else None
        size = _side(size if size is not None else processor.get("size"))
        if size is not None:
            settings["size"] = size
        if processor.get("image_mean") is not None:
            settings["mean"] = [float(v) for v in processor["image_mean"]]
        if processor.get("image_std") is not None:
            settings["std"] = [float(v) for v in processor["image_std"]]
    elif isinstance(config.get("pretrained_cfg"), dict):  # timm
        timm_cfg = config["pretrained_cfg"]
        if timm_cfg.get("input_size"):
            settings["size"] = int(timm_cfg["input_size"][-1])
        for key in ("mean", "std"):
            if timm_cfg.get(key) is not None:
                settings[key] = [float(v) for v in timm_cfg[key]]
    if "size" not in settings:
        vision = config.get("vision_config") or config
        if isinstance(vision.get("image_size"), int):
            settings["size"] = vision["image_size"]
    return settings


def _side(size: Any) -> int | None:
    """The square side of an HF ``size``/``crop_size``: an int or a dict of
    height/width, shortest_edge or longest_edge."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        for key in ("height", "shortest_edge", "longest_edge", "width"):
            if isinstance(size.get(key), int):
                return size[key]
    return None


def audio_settings(path: str | Path) -> dict[str, Any]:
    """``{"sample_rate", "normalize", "max_seconds"}`` (those found) for the
    ``AudioProcessor`` of a pretrained audio directory's feature extractor.

    wav2vec2/HuBERT: ``sampling_rate`` and ``do_normalize``. Whisper: ``sampling_rate``, no
    normalisation (its log-mel features are computed from the raw wave) and at most
    ``chunk_length`` seconds (the encoder's window). Empty without a feature extractor.
    """
    extractor = _read_json(Path(path) / PREPROCESSOR_CONFIG)
    if extractor is None:
        return {}
    settings: dict[str, Any] = {}
    if extractor.get("sampling_rate"):
        settings["sample_rate"] = int(extractor["sampling_rate"])
    if "Whisper" in str(extractor.get("feature_extractor_type", "")):
        settings["normalize"] = False
        if extractor.get("chunk_length"):
            settings["max_seconds"] = float(extractor["chunk_length"])
    elif "do_normalize" in extractor:
        settings["normalize"] = bool(extractor["do_normalize"])
    return settings


def has_tokenizer(path: str | Path) -> bool:
    """Whether the directory holds a tokenizer."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def resolve_processor_config(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose ``processor`` follows the model's pretrained directories.

    - ``model.vision.pretrained`` (a directory): ``processor.image`` size, mean and std (the
      size of an explicit timm ``img_size`` wins: it overrides the directory's architecture);
    - ``model.audio.pretrained`` (a directory): ``processor.audio`` sample rate and
      normalisation, and for Whisper at most its window length;
    - ``model.decoder.pretrained`` holding a tokenizer: ``processor.tokenizer`` loads it
      (with its chat template) instead of building one.

    Settings already equal stay; each change is logged. ``cfg`` itself is not modified.
    """
    model = cfg.get("model") or {}
    changes: dict[str, Any] = {}
    vision, audio, decoder = (model.get(k) or {} for k in ("vision", "audio", "decoder"))
    if vision.get("pretrained"):
        changes.update({f"image.{k}": v for k, v in image_settings(vision.pretrained).items()})
        size = vision.get("img_size")  # timm arguments override the directory's architecture
        if size is not None:
            changes["image.size"] = int(size if isinstance(size, int) else size[0])
    if audio.get("pretrained"):
        found = audio_settings(audio.pretrained)
        processor_audio = cfg.processor.get("audio") or {}
        if "max_seconds" in found and processor_audio.get("max_seconds") is not None:
            found["max_seconds"] = min(found["max_seconds"], processor_audio.max_seconds)
        changes.update({f"audio.{k}": v for k, v in found.items()})
    if decoder.get("pretrained") and has_tokenizer(decoder.pretrained):
        changes["tokenizer"] = {"_target_": LOAD_TOKENIZER, "path": str(decoder.pretrained)}
    if not changes:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key, value in changes.items():
            section, _, name = key.rpartition(".")
            node = cfg.processor[section] if section else cfg.processor
            old = node.get(name)
            old = old if not isinstance(old, DictConfig) else dict(old)
            if old != value:
                log.info("processor.%s: %s -> %s (from the pretrained model)", key, old, value)
                node[name] = value
    return cfg
