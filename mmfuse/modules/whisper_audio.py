"""Whisper's encoder as an audio encoder: log-mel features from the raw waveform."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmfuse.modules.encoders import _absent, _rows, _scatter
from mmfuse.pretrained import PREPROCESSOR_CONFIG
from mmfuse.types import ModalityTokens

# a WhisperModel / WhisperForConditionalGeneration checkpoint holds the encoder under a prefix
_ENCODER_KEYS = {r"^(model\.)?encoder\.": ""}


def load_whisper_encoder(path: str | Path) -> WhisperEncoder:
    """Loads the encoder of a Whisper directory: a saved ``WhisperModel``,
    ``WhisperForConditionalGeneration`` or ``WhisperEncoder`` (the decoder is not kept).

    Raises:
        ValueError: the directory holds no complete Whisper encoder.
    """
    encoder, info = WhisperEncoder.from_pretrained(
        str(path), key_mapping=_ENCODER_KEYS, output_loading_info=True
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path}: no Whisper encoder weights for {missing[:5]}...")
    return encoder


class WhisperAudioEncoder(nn.Module):
    """Whisper's encoder (``WhisperModel.get_encoder()``) on 16 kHz waveforms.

    The log-mel features are computed here, on the model's device, exactly as the directory's
    ``WhisperFeatureExtractor`` computes them (without dither): each clip is cropped or
    zero-padded to the encoder's window (30 s for the released models), so every row gives
    ``max_source_positions`` frames; those past the end of the clip are masked out. The
    processor must not normalise the wave (``mmfuse.pretrained.audio_settings`` says so).

    Args:
        d_model: fusion width the frames are projected to.
        config: a ``WhisperConfig`` for random initialisation (ignored with ``pretrained``).
        pretrained: local Whisper directory (see :func:`load_whisper_encoder`).
        feature_extractor: directory of the ``WhisperFeatureExtractor`` settings
            (``preprocessor_config.json``); default ``pretrained``; without one the
            standard settings (16 kHz, hop 160, n_fft 400, ``num_mel_bins`` mels).
    """

    def __init__(
        self,
        d_model: int,
        config: WhisperConfig | None = None,
        pretrained: str | None = None,
        feature_extractor: str | None = None,
    ) -> None:
        super().__init__()
        if pretrained:
            self.backbone = load_whisper_encoder(pretrained)
        elif config is not None:
            self.backbone = WhisperEncoder(config)
        else:
            raise ValueError("WhisperAudioEncoder needs a config or a pretrained directory")
        # no LayerDrop: a skipped layer gets no gradient (DDP without unused-parameter search)
        self.backbone.layerdrop = self.backbone.config.encoder_layerdrop = 0.0
        # fixed sinusoids in Whisper (loading does not keep WhisperEncoder's own freezing)
        self.backbone.embed_positions.requires_grad_(False)
        cfg = self.backbone.config
        mel_frames = cfg.max_source_positions * self.backbone.conv1.stride[0]
        mel_frames *= self.backbone.conv2.stride[0]
        source = feature_extractor or pretrained
        if source and (Path(source) / PREPROCESSOR_CONFIG).is_file():
            extractor = WhisperFeatureExtractor.from_pretrained(str(source))
        else:
            seconds = mel_frames * 160 / 16000
            extractor = WhisperFeatureExtractor(
                feature_size=cfg.num_mel_bins,
                chunk_length=int(seconds) if seconds == int(seconds) else seconds,
            )
        if extractor.feature_size != cfg.num_mel_bins:
            raise ValueError(
                f"Whisper feature extractor has {extractor.feature_size} mel bins, the encoder "
                f"{cfg.num_mel_bins}"
            )
        self.feature_extractor = extractor  # saved beside the config by model_dir
        self.n_fft, self.hop_length = extractor.n_fft, extractor.hop_length
        self.n_samples = mel_frames * extractor.hop_length  # the encoder's window
        mel_filters = torch.as_tensor(extractor.mel_filters, dtype=torch.float32)
        self.register_buffer("mel_filters", mel_filters, persistent=False)  # (n_freq, n_mels)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.proj = nn.Linear(cfg.d_model, d_model)

    @property
    def sample_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """(b, n_samples) waveforms -> (b, n_mels, n_samples / hop) Whisper log-mel features."""
        stft = torch.stft(
            waves.float(), self.n_fft, self.hop_length, window=self.window, return_complex=True
        )
        power = (stft[..., :-1].abs() ** 2).contiguous()  # (b, n_freq, frames)
        mel = self.mel_filters.T @ power  # (b, n_mels, frames)
        log_spec = mel.clamp(min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log_spec + 4.0) / 4.0

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> ModalityTokens:
        """waves (B, S), lengths (B,) valid samples (0 = no audio) -> (B, F, D), mask (B, F)."""
        present = lengths > 0
        rows, dummy = _rows(present)
        if dummy and not torch.is_grad_enabled():
            return _absent(waves.shape[0], self.proj)
        sub = waves[rows, : self.n_samples]
        if sub.shape[1] < self.n_samples:
            sub = F.pad(sub, (0, self.n_samples - sub.shape[1]))
        features = self.log_mel(sub).to(self.proj.weight.dtype)  # (b, n_mels, 2F)
        hidden = self.backbone(input_features=features).last_hidden_state  # (b, F, H)
        full = _scatter(self.proj(hidden), rows, waves.shape[0])  # (B, F, D)
        valid = lengths.clamp(max=self.n_samples)
        mel_frames = (valid + self.hop_length - 1) // self.hop_length
        frames = self.backbone._get_feat_extract_output_lengths(mel_frames)  # (B,)
        positions = torch.arange(full.shape[1], device=waves.device)
        mask = (positions[None, :] < frames[:, None]) & present[:, None]
        return ModalityTokens(full, mask)
