"""The wav2vec2 convolutional front end, run channels-last.

transformers' ``Wav2Vec2FeatureEncoder`` (and HuBERT's, WavLM's, Data2Vec's: the same layers)
keeps its activations as (B, C, T) for ``nn.Conv1d``, so every layer with ``feat_extract_norm
= "layer"`` transposes to (B, T, C) for its LayerNorm and back: two copies of the largest
activations in the model (the first layer's output has 3,200 frames a second), and a 1-D
convolution that PyTorch's CPU kernels run slowly, above all in the backward pass.

``ChannelsLastFeatureEncoder`` runs the same layers on the same parameters with the
activations kept (B, T, C): each convolution is a 2-D convolution of height 1 over a
channels-last tensor, whose output is (B, T', C') in memory, ready for the LayerNorm. Outputs
equal the original's up to float rounding; on the demo's front end (16 or 32 clips of one
second, 1 or 2 CPU threads) the forward pass is 1.8-2.1 times and forward plus backward
3.8-4.0 times faster (``benchmarks/audio_frontend.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _is_plain_conv(conv: nn.Module) -> bool:
    """A bare ``nn.Conv1d`` (not wrapped by an adapter such as LoRA) that the channels-last
    path computes exactly."""
    return (
        type(conv) is nn.Conv1d
        and conv.padding == (0,)
        and conv.dilation == (1,)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def conv_norm_act(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One layer (``conv``, ``layer_norm``, ``activation``) channels-last:
    hidden (B, T, C) -> (B, T', C')."""
    conv = layer.conv
    planes = hidden.transpose(1, 2).unsqueeze(2)  # (B, C, 1, T), channels-last in memory
    weight = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(planes, weight, conv.bias, stride=(1, conv.stride[0]))  # (B, C', 1, T')
    out = out.squeeze(2).transpose(1, 2)  # (B, T', C'), contiguous
    return layer.activation(layer.layer_norm(out))


def checkpointed(layer: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is switched on in ``layer``."""
    return bool(getattr(layer, "gradient_checkpointing", False))


class ChannelsLastFeatureEncoder(nn.Module):
    """Drop-in replacement of a LayerNorm wav2vec2 feature encoder: same ``conv_layers``
    (so the same parameter names and checkpoints), same input (B, S) and output (B, C, T).

    A layer whose convolution is not a plain ``nn.Conv1d`` (e.g. wrapped by LoRA) runs its
    own forward; gradient checkpointing switched on in a layer is honoured.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not self.supports(encoder):
            raise ValueError(f"{type(encoder).__name__} is not a LayerNorm conv feature encoder")
        self.conv_layers = encoder.conv_layers
        self._requires_grad = getattr(encoder, "_requires_grad", True)

    @staticmethod
    def supports(encoder: nn.Module | None) -> bool:
        """Whether ``encoder`` is a feature encoder whose every layer is conv, LayerNorm,
        activation (``feat_extract_norm="layer"``); group-norm front ends are not."""
        layers = getattr(encoder, "conv_layers", None)
        return bool(layers) and all(
            isinstance(getattr(layer, "layer_norm", None), nn.LayerNorm)
            and _is_plain_conv(getattr(layer, "conv", None))
            and hasattr(layer, "activation")
            for layer in layers
        )

    def _freeze_parameters(self) -> None:
        """What transformers' ``freeze_feature_encoder`` calls."""
        for param in self.parameters():
            param.requires_grad = False
        self._requires_grad = False

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        """input_values (B, S) -> features (B, C, T), as the original encoder returns them
        (a transposed view of a (B, T, C) tensor)."""
        hidden = input_values[:, :, None]  # (B, S, 1)
        for layer in self.conv_layers:
            if not _is_plain_conv(layer.conv):
                hidden = layer(hidden.transpose(1, 2)).transpose(1, 2)
            elif checkpointed(layer) and self.training and torch.is_grad_enabled():
                hidden = checkpoint(conv_norm_act, layer, hidden, use_reentrant=False)
            else:
                hidden = conv_norm_act(layer, hidden)
        return hidden.transpose(1, 2)
