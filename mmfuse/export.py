"""Export entry point: ``mmfuse-export ckpt=<model dir> output_dir=<dir>``.

Writes a model directory in the standard Hugging Face layout:

- ``decoder/``: the language model (LoRA adapters merged) with its tokenizer and chat
  template; ``transformers.AutoModelForCausalLM.from_pretrained(<dir>/decoder)`` and
  ``AutoTokenizer.from_pretrained(<dir>/decoder)`` load it on their own;
- ``multimodal.safetensors``: every other weight (``encoders.*``, ``fusion.*``,
  ``conditioning.*``), named as in ``MMFuseModel``;
- ``config.yaml``: the model and processor configs, the decoder and tokenizer pointing at
  ``decoder/``; and the ``<part>_config/`` directories of the model directory.

:func:`load_export` builds the whole ``MMFuseModel`` back from it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from mmfuse.config import CONFIG_DIR
from mmfuse.lora import merge_lora
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import CONFIG, build_processor_and_model, load_model_dir
from mmfuse.processing.processor import Processor

log = logging.getLogger(__name__)

DECODER, WEIGHTS = "decoder", "multimodal.safetensors"


def export(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Exports the model directory ``model_dir`` to ``output_dir`` (created).

    Returns:
        ``output_dir``.
    """
    model_dir, out = Path(model_dir), Path(output_dir)
    model, _ = load_model_dir(model_dir)
    merge_lora(model)  # a model directory holds plain weights already; this is a safeguard
    out.mkdir(parents=True, exist_ok=True)
    model.decoder.save_pretrained(str(out / DECODER))
    model.tokenizer.save_pretrained(str(out / DECODER))
    weights = {
        name: tensor.detach().contiguous().clone()  # clones: no storage shared with others
        for name, tensor in model.state_dict().items()
        if not name.startswith(f"{DECODER}.")
    }
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    for part in sorted(model_dir.glob("*_config")):
        if part.is_dir() and part.name != f"{DECODER}_config":
            shutil.copytree(part, out / part.name, dirs_exist_ok=True)
    cfg = OmegaConf.load(model_dir / CONFIG)  # unresolved: ${model_dir} now means `out`
    cfg.model.decoder = {
        "_target_": "mmfuse.modules.decoder.build_decoder",
        "_partial_": True,
        "pretrained": "${model_dir}/" + DECODER,
    }
    cfg.processor.tokenizer = {
        "_target_": "mmfuse.processing.text.load_tokenizer",
        "path": "${model_dir}/" + DECODER,
    }
    OmegaConf.save(cfg, out / CONFIG)
    return out


def load_export(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MMFuseModel, Processor]:
    """Builds the ``MMFuseModel`` of an export directory (in eval mode).

    Raises:
        ValueError: naming the weights that are missing or unexpected.
    """
    path = Path(path)
    cfg = OmegaConf.load(path / CONFIG)
    cfg.model_dir = str(path.resolve())
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    processor, model = build_processor_and_model(cfg)
    expected = {n for n in model.state_dict() if not n.startswith(f"{DECODER}.")}
    weights = load_file(str(path / WEIGHTS))
    if set(weights) != expected:
        raise ValueError(
            f"{path / WEIGHTS}: missing {sorted(expected - set(weights))}, "
            f"unexpected {sorted(set(weights) - expected)}"
        )
    model.load_state_dict(weights, strict=False)
    return model.to(device).eval(), processor


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper around :func:`export`."""
    out = export(cfg.ckpt, cfg.output_dir)
    log.info("exported %s to %s (decoder: %s)", cfg.ckpt, out, out / DECODER)


if __name__ == "__main__":
    main()
