"""Vision encoders from transformers: ``ViTModel``, ``CLIPVisionModel`` and the like."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mmfuse.modules.encoders import _absent, _batchnorm_stats_frozen, _rows, _scatter
from mmfuse.types import ModalityTokens


def _vision_config(config: PretrainedConfig) -> PretrainedConfig:
    """The vision tower's config of a dual encoder (CLIP, SigLIP), else ``config``."""
    return getattr(config, "vision_config", None) or config


def _model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError as err:
        raise ValueError(f"no transformers vision model for {type(config).__name__}") from err


def _no_pooler(cls: type[PreTrainedModel]) -> dict:
    """``add_pooling_layer=False`` where the class takes it: a pooler the tokens do not use
    would get no gradient."""
    takes = "add_pooling_layer" in inspect.signature(cls.__init__).parameters
    return {"add_pooling_layer": False} if takes else {}


def load_vision_backbone(path: str) -> PreTrainedModel:
    """Loads a transformers vision model from a local directory: a ``ViTModel``,
    ``CLIPVisionModel`` (or the vision tower of a whole ``CLIPModel`` directory), ...
    """
    config = AutoConfig.from_pretrained(str(path))
    cls = _model_class(_vision_config(config))
    return cls.from_pretrained(str(path), **_no_pooler(cls))


class HFVisionEncoder(nn.Module):
    """A transformers vision transformer; all its output tokens go to the fusion.

    Parameters the tokens do not depend on (CLIP's post-layernorm, which only feeds the
    pooled output; the layers after ``select_layer``) are frozen: they would get no gradient.

    Args:
        d_model: fusion width the tokens are projected to.
        config: e.g. ``ViTConfig`` or ``CLIPVisionConfig`` for random initialisation
            (ignored with ``pretrained``).
        pretrained: local directory of a saved model (see :func:`load_vision_backbone`).
        select_layer: hidden-state index whose tokens are used: -1 the model's output
            (``last_hidden_state``), -2 the penultimate layer (LLaVA's choice for CLIP), ...
    """

    def __init__(
        self,
        d_model: int,
        config: PretrainedConfig | None = None,
        pretrained: str | None = None,
        select_layer: int = -1,
    ) -> None:
        super().__init__()
        if pretrained:
            self.backbone = load_vision_backbone(pretrained)
        elif config is not None:
            config = _vision_config(config)
            cls = _model_class(config)
            self.backbone = cls(config, **_no_pooler(cls))
        else:
            raise ValueError("HFVisionEncoder needs a config or a pretrained directory")
        self.select_layer = select_layer
        self.proj = nn.Linear(self.backbone.config.hidden_size, d_model)
        self._freeze_unused()

    @property
    def image_size(self) -> int:
        """The side of the square images the model takes."""
        size = self.backbone.config.image_size
        return size if isinstance(size, int) else size[0]

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> (b, N, hidden) tokens of ``select_layer``."""
        if self.select_layer == -1:
            return self.backbone(pixel_values=pixels).last_hidden_state
        out = self.backbone(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[self.select_layer]

    def forward(self, pixels: torch.Tensor, present: torch.Tensor) -> ModalityTokens:
        """pixels (B, 3, H, W), present (B,) bool -> tokens (B, N, D), mask (B, N)."""
        rows, dummy = _rows(present)
        if dummy and not torch.is_grad_enabled():
            return _absent(pixels.shape[0], self.proj)
        with _batchnorm_stats_frozen(self.backbone, dummy):
            feats = self.proj(self._features(pixels[rows]))  # (b, N, D)
        full = _scatter(feats, rows, pixels.shape[0])
        return ModalityTokens(full, present[:, None].expand(-1, full.shape[1]))

    def _freeze_unused(self) -> None:
        """Freezes the backbone parameters one forward pass leaves without a gradient."""
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        channels = getattr(self.backbone.config, "num_channels", 3)
        pixels = torch.zeros(1, channels, self.image_size, self.image_size)
        pixels = pixels.to(self.proj.weight.device, self.proj.weight.dtype)
        with (
            torch.enable_grad(),
            torch.random.fork_rng(devices=[]),  # the RNG and any BatchNorm statistics untouched
            _batchnorm_stats_frozen(self.backbone, True),
        ):
            out = self._features(pixels).float().sum()
            grads = torch.autograd.grad(out, params, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            if grad is None:
                param.requires_grad_(False)
