"""MMFuseModel: encoders -> fusion -> conditioning -> causal LM decoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmfuse.freezing import frozen_units, has_trainable
from mmfuse.modules.encoders import AudioEncoder, TextEncoder, VisionEncoder
from mmfuse.processing.text import IGNORE_INDEX
from mmfuse.types import Batch, Memory, ModalityTokens


class DecoderInputs(NamedTuple):
    """What the decoder consumes for one batch (L = M memory tokens + T text tokens).

    embeds (B, L, H), attention_mask (B, L), position_ids (B, L), labels (B, L).
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor


class MMFuseModel(nn.Module):
    """The whole multimodal model.

    Args:
        tokenizer: the processor's tokenizer; the decoder and text encoder are sized by it.
        d_model: width shared by encoder outputs, fusion and memory.
        decoder: builds the causal LM given ``tokenizer=``.
        fusion: builds the fusion given ``modalities=``.
        conditioning: builds the conditioning given ``lm_hidden=`` (decoder width).
        vision: image encoder or None.
        audio: audio encoder or None.
        text: builds the optional prompt encoder given ``tokenizer=``, or None.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        d_model: int,
        decoder: Callable[..., PreTrainedModel],
        fusion: Callable[..., nn.Module],
        conditioning: Callable[..., nn.Module],
        vision: VisionEncoder | None = None,
        audio: AudioEncoder | None = None,
        text: Callable[..., TextEncoder] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.d_model = d_model
        encoders: dict[str, nn.Module] = {}
        if vision is not None:
            encoders["image"] = vision
        if audio is not None:
            encoders["audio"] = audio
        if text is not None:
            encoders["text"] = text(tokenizer=tokenizer)
        if not encoders:
            raise ValueError("model: at least one of model.vision, model.audio, model.text")
        for name, encoder in encoders.items():
            if encoder.proj.out_features != d_model:
                raise ValueError(f"model.{name}: d_model {encoder.proj.out_features} != {d_model}")
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion(modalities=list(encoders))
        self.decoder = decoder(tokenizer=tokenizer)
        self.conditioning = conditioning(lm_hidden=self.decoder.config.hidden_size)

    def train(self, mode: bool = True) -> MMFuseModel:
        """Sets the training mode; frozen parts (``freezing.frozen_units``) stay in eval mode,
        so the ``train()`` calls of a training loop do not turn their dropout back on."""
        super().train(mode)
        if mode:
            for unit in frozen_units(self):
                unit.eval()
        return self

    def encode(self, batch: Batch) -> Memory:
        """Runs every encoder and the fusion: Batch -> Memory (B, M, D).

        An encoder without trainable parameters runs under ``torch.no_grad``.
        """
        inputs = {
            "image": (batch.pixel_values, batch.has_image),
            "audio": (batch.audio_values, batch.audio_lengths),
            "text": (batch.prompt_ids, batch.prompt_mask),
        }
        tokens: dict[str, ModalityTokens] = {}
        for name, encoder in self.encoders.items():
            with torch.set_grad_enabled(torch.is_grad_enabled() and has_trainable(encoder)):
                tokens[name] = encoder(*inputs[name])
        return self.fusion(tokens)

    def prepare_inputs(self, batch: Batch) -> DecoderInputs:
        """Turns a batch into decoder embeddings, mask, positions and targets.

        The memory prefix comes first; positions count only attended tokens, so left- and
        right-padded batches give every token the same position.
        """
        prefix, prefix_mask = self.conditioning(self.encode(batch))  # (B, M, H), (B, M)
        tokens = self.decoder.get_input_embeddings()(batch.input_ids)  # (B, T, H)
        embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (B, M+T, H)
        mask = torch.cat([prefix_mask, batch.attention_mask.to(prefix_mask.dtype)], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        ignored = batch.labels.new_full(prefix_mask.shape, IGNORE_INDEX)
        labels = torch.cat([ignored, batch.labels], dim=1)
        return DecoderInputs(embeds, mask, positions, labels)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns logits (B, L, V) and the aligned labels (B, L) (not yet shifted)."""
        inputs = self.prepare_inputs(batch)
        out = self.decoder(
            inputs_embeds=inputs.embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
        )
        return out.logits, inputs.labels
