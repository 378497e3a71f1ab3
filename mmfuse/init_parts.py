"""Starting chosen parts of a new model from a model directory (``init_parts`` in train.yaml).

``init_from`` starts a whole model from a model directory, architecture included. ``init_parts``
builds the model from ``model`` as usual and copies only the named parts' weights, e.g. the
encoders a previous run trained, as one would start from CLIP or wav2vec 2.0::

    init_parts: {from: runs/demo/model, parts: [encoders.image, encoders.audio]}

Every weight of a named part must be in the directory with the same shape, and the inputs the
part was trained on must be the ones it will get: an encoder's preprocessing
(``processor.image``/``processor.audio`` settings) and, for a part that reads tokens (the
decoder, the prompt encoder), the tokenizer's vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from mmfuse.model import MMFuseModel
from mmfuse.model_dir import WEIGHTS, load_processor_dir
from mmfuse.processing.processor import Processor

log = logging.getLogger(__name__)

# parts whose inputs come from a tokenizer
_TOKEN_PARTS = ("decoder", "encoders.text")


def load_parts(
    model: MMFuseModel, processor: Processor, model_dir: str | Path | None, parts: list[str]
) -> int:
    """Copies the weights of ``parts`` (module names of ``model``, e.g. ``encoders.image``)
    from the model directory ``model_dir`` into ``model``.

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: naming the directory, the part and what does not fit (a part the model
            lacks, a weight missing from the directory or of another shape, other
            preprocessing or another vocabulary).
        FileNotFoundError: ``model_dir`` is no model directory.
    """
    if not model_dir:
        raise ValueError("init_parts: no model directory given (init_parts.from)")
    model_dir = Path(model_dir)
    weights = model_dir / WEIGHTS
    if not parts:
        raise ValueError(f"init_parts: no parts named to load from {model_dir} (init_parts.parts)")
    try:
        saved_processor = load_processor_dir(model_dir)
    except FileNotFoundError as err:  # e.g. experiment=world_sweep before `make demo`
        raise FileNotFoundError(
            f"init_parts.from: {err}; it must be the model/ directory a run wrote "
            "(experiment=world_sweep starts from runs/demo/model: run `make demo` first)"
        ) from err
    own = model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as handle:
        saved_keys = set(handle.keys())
        for part in parts:
            names = [k for k in own if k.startswith(f"{part}.")]
            if not names:
                raise ValueError(f"init_parts: the model has no part {part!r} with weights")
            _check_inputs(part, processor, saved_processor, model_dir)
            for name in names:
                if name not in saved_keys:
                    raise ValueError(f"{weights}: part {part}: no weight {name}")
                tensor = handle.get_tensor(name)
                if tensor.shape != own[name].shape:
                    raise ValueError(
                        f"{weights}: part {part}: {name} has shape {tuple(tensor.shape)}, "
                        f"the model's is {tuple(own[name].shape)}"
                    )
                copied[name] = tensor
    model.load_state_dict(copied, strict=False)
    log.info("init_parts: %d tensors of %s from %s", len(copied), ", ".join(parts), model_dir)
    return len(copied)


def _check_inputs(part: str, processor: Processor, saved: Processor, model_dir: Path) -> None:
    """Fails when ``part`` would get other inputs than those it was trained on."""
    for modality in ("image", "audio"):
        if _overlaps(part, f"encoders.{modality}"):
            mine, theirs = (_settings(p, modality) for p in (processor, saved))
            if mine is None or mine != theirs:
                raise ValueError(
                    f"init_parts: {part} from {model_dir} was trained on processor.{modality} "
                    f"{theirs}, this run has {mine}"
                )
    reads_tokens = any(_overlaps(part, reader) for reader in _TOKEN_PARTS)
    if reads_tokens and processor.tokenizer.get_vocab() != saved.tokenizer.get_vocab():
        raise ValueError(f"init_parts: {part} from {model_dir} was trained with another tokenizer")


def _overlaps(part: str, module: str) -> bool:
    """Whether ``part`` holds some of ``module`` (``encoders`` holds ``encoders.image``, and
    ``encoders.image.backbone`` is part of it)."""
    return module == part or module.startswith(f"{part}.") or part.startswith(f"{module}.")


def _settings(processor: Processor, modality: str) -> dict | None:
    """The preprocessing settings of one modality, or None when the processor has none."""
    media = getattr(processor, modality)
    return None if media is None else media.settings()
