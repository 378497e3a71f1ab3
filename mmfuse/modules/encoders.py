"""Modality encoders: each maps its raw input to ``ModalityTokens`` in the fusion width.

Every encoder runs on the records of the batch that carry its modality only. When no record
does, it runs on one dummy row whose tokens are masked out, so that every parameter takes
part in every step (DDP then needs no unused-parameter search and never hangs). Without
autograd (serving, chat, evaluation) nothing needs that: the encoder then returns one masked
zero token per row without running (``_absent``), which spares a lone image-only or
audio-only request a whole pass of the other encoder.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedTokenizerBase

from mmfuse.modules.audio_frontend import ChannelsLastFeatureEncoder
from mmfuse.types import ModalityTokens


def _rows(present: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Indices of the rows to encode: the present ones, or row 0 as a dummy if none is; and
    whether it is that dummy (known on the host from ``nonzero``'s shape: no extra read)."""
    rows = present.nonzero().squeeze(1)
    if rows.numel():
        return rows, False
    return torch.zeros(1, dtype=torch.long, device=present.device), True


def _absent(batch_size: int, proj: nn.Linear) -> ModalityTokens:
    """What an encoder returns when no record carries its modality and no gradient is
    needed (serving, evaluation, chat): one zero token per row, masked out, instead of a
    pass over a dummy row. The fusion ignores masked tokens either way."""
    weight = proj.weight
    feats = weight.new_zeros(batch_size, 1, proj.out_features)
    return ModalityTokens(feats, torch.zeros(batch_size, 1, dtype=torch.bool, device=weight.device))


def _scatter(sub: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Places (b, N, D) encoded rows back into a zero (B, N, D) tensor."""
    full = sub.new_zeros((batch_size, *sub.shape[1:]))
    return full.index_copy(0, rows, sub)


def _min_samples(kernels: list[int], strides: list[int]) -> int:
    """Shortest waveform the convolutional front end turns into one frame."""
    length = 1
    for kernel, stride in zip(reversed(kernels), reversed(strides), strict=False):
        length = (length - 1) * stride + kernel
    return length


@contextmanager
def _batchnorm_stats_frozen(module: nn.Module, frozen: bool) -> Iterator[None]:
    """Runs BatchNorm layers with their running statistics (and without updating them) when
    ``frozen``: a masked dummy row must not move the statistics of real images."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    if frozen:
        for norm in norms:
            norm.train(False)
    try:
        yield
    finally:
        for norm, mode in zip(norms, modes, strict=True):
            norm.train(mode)


class ConvStem(nn.Sequential):
    """Early convolutions for a ViT (Xiao et al., 2021): 3x3 stride-2 conv, BatchNorm, ReLU.

    (B, 3, H, W) -> (B, channels[-1], H / 2**len(channels), W / 2**len(channels)).
    """

    def __init__(self, in_chans: int, channels: Sequence[int]) -> None:
        layers: list[nn.Module] = []
        for out_chans in channels:
            layers += [
                nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_chans),
                nn.ReLU(inplace=True),
            ]
            in_chans = out_chans
        super().__init__(*layers)


class VisionEncoder(nn.Module):
    """A timm Vision Transformer; all its tokens (class and patches) go to the fusion.

    Args:
        d_model: fusion width the tokens are projected to.
        model_name: timm architecture name; keyword arguments override its sizes.
        pretrained: path of a local weights file (safetensors or a state dict) for
            ``model_name``, or a timm model directory (``config.json`` with the architecture,
            its arguments and ``pretrained_cfg``, and the weights, as
            ``timm.models.save_for_hf`` writes it), whose architecture replaces
            ``model_name`` (keyword arguments still override it, timm's rule); or None.
        conv_stem: channels of stride-2 convolutions that replace the linear patch
            embedding (a hybrid ViT; ``patch_size`` then counts feature-map cells, usually 1).
            Early convolutions make a small ViT learn from scratch much faster.
        pos_embed_std: standard deviation of the random position embeddings (timm uses
            0.02); larger values let a ViT trained from scratch tell places apart from the
            first step. Ignored with ``pretrained``.
        **vit_kwargs: timm arguments such as img_size, patch_size, embed_dim, depth, num_heads.
    """

    def __init__(
        self,
        d_model: int,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: str | None = None,
        conv_stem: Sequence[int] | None = None,
        pos_embed_std: float | None = None,
        **vit_kwargs,
    ) -> None:
        super().__init__()
        if conv_stem:
            stem = ConvStem(vit_kwargs.get("in_chans", 3), conv_stem)
            vit_kwargs["embed_layer"] = partial(timm.layers.HybridEmbed, backbone=stem)
        overlay = {"file": str(Path(pretrained))} if pretrained else None
        if pretrained and Path(pretrained).is_dir():
            model_name, overlay = f"local-dir:{Path(pretrained).resolve()}", None
        self.backbone = timm.create_model(
            model_name,
            pretrained=bool(pretrained),
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            global_pool="",
            **vit_kwargs,
        )
        if pos_embed_std is not None and not pretrained and self.backbone.pos_embed is not None:
            nn.init.normal_(self.backbone.pos_embed, std=pos_embed_std)
        self.proj = nn.Linear(self.backbone.embed_dim, d_model)

    def forward(self, pixels: torch.Tensor, present: torch.Tensor) -> ModalityTokens:
        """pixels (B, 3, H, W), present (B,) bool -> tokens (B, N, D), mask (B, N)."""
        rows, dummy = _rows(present)
        if dummy and not torch.is_grad_enabled():
            return _absent(pixels.shape[0], self.proj)
        with _batchnorm_stats_frozen(self.backbone, dummy):
            feats = self.proj(self.backbone.forward_features(pixels[rows]))  # (b, N, D)
        full = _scatter(feats, rows, pixels.shape[0])
        return ModalityTokens(full, present[:, None].expand(-1, full.shape[1]))


class AudioEncoder(nn.Module):
    """A transformers ``Wav2Vec2Model`` (or any model with its interface: ``HubertModel``,
    ``WavLMModel``...) on raw waveforms.

    Args:
        d_model: fusion width the frames are projected to.
        config: e.g. ``Wav2Vec2Config`` for random initialisation (ignored with ``pretrained``).
        pretrained: local directory of a saved model, loaded with ``AutoModel``.
    """

    def __init__(
        self, d_model: int, config: PretrainedConfig | None = None, pretrained: str | None = None
    ) -> None:
        super().__init__()
        if pretrained:
            # no LayerDrop: a skipped layer gets no gradient (DDP without unused-parameter
            # search); pretrained wav2vec2/HuBERT configs often enable it
            self.backbone = AutoModel.from_pretrained(str(pretrained), layerdrop=0.0)
        elif config is not None:
            self.backbone = AutoModel.from_config(config)
        else:
            raise ValueError("AudioEncoder needs a config or a pretrained directory")
        extractor = getattr(self.backbone, "feature_extractor", None)
        if ChannelsLastFeatureEncoder.supports(extractor):  # same weights, faster layout
            self.backbone.feature_extractor = ChannelsLastFeatureEncoder(extractor)
        cfg = self.backbone.config
        spec_augment = cfg.apply_spec_augment and (
            cfg.mask_time_prob > 0 or cfg.mask_feature_prob > 0
        )
        masked_embed = getattr(self.backbone, "masked_spec_embed", None)
        if masked_embed is not None and not spec_augment:
            masked_embed.requires_grad_(False)  # never used without SpecAugment
        self.takes_mask = getattr(cfg, "feat_extract_norm", "layer") == "layer"
        self.min_samples = _min_samples(cfg.conv_kernel, cfg.conv_stride)
        self.proj = nn.Linear(cfg.hidden_size, d_model)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> ModalityTokens:
        """waves (B, S), lengths (B,) valid samples (0 = no audio) -> (B, F, D), mask (B, F)."""
        present = lengths > 0
        rows, dummy = _rows(present)
        if dummy and not torch.is_grad_enabled():
            return _absent(waves.shape[0], self.proj)
        sub_waves, sub_lengths = waves[rows], lengths[rows].clamp(min=1)
        if sub_waves.shape[1] < self.min_samples:  # too short for one frame: zero-pad
            sub_waves = F.pad(sub_waves, (0, self.min_samples - sub_waves.shape[1]))
        if dummy:  # masked out below
            sub_lengths = sub_lengths.new_full((1,), self.min_samples)
        sample_mask = None
        if self.takes_mask:
            positions = torch.arange(sub_waves.shape[1], device=waves.device)
            sample_mask = (positions[None, :] < sub_lengths[:, None]).long()  # (b, S)
        hidden = self.backbone(sub_waves, attention_mask=sample_mask).last_hidden_state
        full = _scatter(self.proj(hidden), rows, waves.shape[0])  # (B, F, D)
        frames = self.backbone._get_feat_extract_output_lengths(lengths)  # (B,)
        positions = torch.arange(full.shape[1], device=waves.device)
        mask = (positions[None, :] < frames[:, None]) & present[:, None]
        return ModalityTokens(full, mask)


class TextEncoder(nn.Module):
    """A transformers encoder over the user's prompt, making the fusion instruction-aware.

    Args:
        tokenizer: the decoder's tokenizer (the encoder reads the same ids).
        d_model: fusion width.
        config: e.g. ``BertConfig`` for random initialisation; its vocab size is set from the
            tokenizer.
        pretrained: local directory of a saved encoder (it must share the tokenizer).
        vocab_size: embedding rows when they differ from ``len(tokenizer)`` (a reloaded
            pretrained encoder with a padded table).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        d_model: int,
        config: PretrainedConfig | None = None,
        pretrained: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if pretrained:
            self.backbone = AutoModel.from_pretrained(str(pretrained), add_pooling_layer=False)
        elif config is not None:
            config.vocab_size = vocab_size or len(tokenizer)
            config.pad_token_id = tokenizer.pad_token_id
            self.backbone = AutoModel.from_config(config, add_pooling_layer=False)
        else:
            raise ValueError("TextEncoder needs a config or a pretrained directory")
        self.proj = nn.Linear(self.backbone.config.hidden_size, d_model)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> ModalityTokens:
        """ids (B, P), mask (B, P) -> tokens (B, P, D), mask (B, P) bool."""
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        return ModalityTokens(self.proj(hidden), mask.bool())
