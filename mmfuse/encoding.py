"""How ``MMFuseModel.encode`` runs one encoder on a batch: on its inputs, window by window for
chunked audio, or not at all when the batch carries the encoder's cached features.

Cached features (``Batch.features``, from ``mmfuse.feature_cache``) are the frozen encoder's
outputs *before* its projection ``proj`` (the last layer of every mmfuse encoder), so a
trainable projection over a frozen backbone (``freeze=encoders``, ``freeze=alignment``) still
trains; :func:`project_features` applies ``proj`` exactly as the encoder would: to the rows
that have the modality (or, when none has, to one dummy row whose tokens are masked, so that
``proj`` takes part in every step as it does without the cache).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.modules.encoders import _rows, _scatter
from mmfuse.types import Batch, EncoderFeatures, ModalityTokens


def run_encoder(
    encoder: nn.Module, name: str, batch: Batch, inputs: tuple[torch.Tensor, ...]
) -> ModalityTokens:
    """The tokens (B, N, D) and mask (B, N) of encoder ``name`` for ``batch``.

    Args:
        encoder: the modality's encoder (it has a ``proj`` output layer).
        name: ``image``, ``audio`` or ``text``.
        batch: the batch (its ``features`` and ``audio_chunk`` decide the route).
        inputs: the encoder's usual arguments for this batch.
    """
    cached = batch.features.get(name) if batch.features else None
    if cached is not None:
        return project_features(encoder, cached)
    if name == "audio" and batch.audio_chunk:
        return encode_audio_chunks(encoder, *inputs, chunk=batch.audio_chunk)
    return encoder(*inputs)


def project_features(encoder: nn.Module, cached: EncoderFeatures) -> ModalityTokens:
    """Cached pre-projection features (B, N, D') -> ``encoder.proj`` tokens (B, N, D)."""
    feats, mask, present = cached
    rows, _ = _rows(present)  # no record has it: one dummy row, masked out
    proj = encoder.proj
    sub = proj(feats[rows].to(proj.weight.dtype))  # (b, N, D)
    return ModalityTokens(_scatter(sub, rows, feats.shape[0]), mask & present[:, None])


def encode_audio_chunks(
    encoder: nn.Module, waves: torch.Tensor, lengths: torch.Tensor, chunk: int
) -> ModalityTokens:
    """Runs the audio encoder on windows of ``chunk`` samples, each separately.

    waves (B, S), lengths (B,) -> tokens (B, C * F, D) with C = ceil(S / chunk) windows of F
    frames each, in time order; frames past a clip's end (and windows wholly past it) masked.
    """
    batch, samples = waves.shape
    if samples <= chunk:
        return encoder(waves, lengths)
    count = -(-samples // chunk)
    windows = F.pad(waves, (0, count * chunk - samples)).reshape(batch * count, chunk)
    starts = torch.arange(count, device=waves.device) * chunk  # (C,)
    window_lengths = (lengths[:, None] - starts[None, :]).clamp(0, chunk)  # (B, C)
    out = encoder(windows, window_lengths.reshape(-1))  # (B*C, F, D)
    frames = out.feats.shape[1]
    feats = out.feats.reshape(batch, count * frames, -1)  # (B, C*F, D)
    return ModalityTokens(feats, out.mask.reshape(batch, count * frames))


@contextmanager
def without_projection(encoder: nn.Module) -> Iterator[None]:
    """Makes ``encoder.proj`` pass its input through while the block runs, so the encoder
    returns its pre-projection features with its usual masks (the feature cache's input)."""
    handle = encoder.proj.register_forward_hook(lambda module, args, output: args[0])
    try:
        yield
    finally:
        handle.remove()
