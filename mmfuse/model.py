"""MMFuseModel: encoders -> fusion -> conditioning -> causal LM decoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmfuse.encoding import run_encoder
from mmfuse.freezing import frozen_units, has_trainable
from mmfuse.modules.conditioning import (
    DecoderInputs,
    TextInputs,
    conditioned,
    decoder_layers,
)
from mmfuse.modules.encoders import AudioEncoder, TextEncoder, VisionEncoder
from mmfuse.modules.onednn_linear import use_onednn_linears
from mmfuse.processing.text import AUDIO_TOKEN, IMAGE_TOKEN
from mmfuse.row_groups import row_groups
from mmfuse.types import Batch, Memory, ModalityTokens

__all__ = ["DecoderInputs", "MMFuseModel", "placeholder_ids"]


def placeholder_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of the media placeholder tokens the tokenizer knows (none for a tokenizer
    without them: the prefix then goes before the text)."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in (IMAGE_TOKEN, AUDIO_TOKEN) if token in vocab]


class MMFuseModel(nn.Module):
    """The whole multimodal model.

    Args:
        tokenizer: the processor's tokenizer; the decoder and text encoder are sized by it.
        d_model: width shared by encoder outputs, fusion and memory.
        decoder: builds the causal LM given ``tokenizer=``.
        fusion: builds the fusion given ``modalities=``.
        conditioning: builds the conditioning given ``lm_hidden=`` and ``lm_layers=`` (the
            decoder's width and number of layers); see ``mmfuse.modules.conditioning``.
        vision: image encoder or None.
        audio: audio encoder or None.
        text: builds the optional prompt encoder given ``tokenizer=``, or None.
        row_groups: in ``forward``, run the decoder over up to this many groups of rows
            of similar length, each trimmed to its longest row (``mmfuse.row_groups``):
            the same logits with fewer padded positions. 1 (the default) runs the padded
            batch at once and reads nothing back from the device.
        onednn_linear: compute the large products of calls without autograd (inference,
            validation, frozen encoders) on oneDNN (``mmfuse.modules.onednn_linear``): on
            CPUs where MKL does not use AVX-512 (AMD) they run about twice as fast.
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
        row_groups: int = 1,
        onednn_linear: bool = True,
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
        self.conditioning = conditioning(
            lm_hidden=self.decoder.config.hidden_size,
            lm_layers=len(decoder_layers(self.decoder)),
        )
        self.placeholder_ids = placeholder_ids(tokenizer)
        if row_groups < 1:
            raise ValueError(f"model.row_groups must be at least 1, got {row_groups}")
        self.row_groups = row_groups
        use_onednn_linears(self, onednn_linear)

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
                # cached features, chunked audio or the plain call (mmfuse.encoding)
                tokens[name] = run_encoder(encoder, name, batch, inputs[name])
        return self.fusion(tokens)

    def prepare_inputs(self, batch: Batch) -> DecoderInputs:
        """Turns a batch into decoder embeddings, mask, positions and targets, conditioned on
        the memory (``DecoderInputs.memory``: run decoder calls inside ``conditioned``).

        Positions count only attended tokens, so left- and right-padded batches give every
        token the same position.
        """
        memory = self.encode(batch)  # (B, M, D)
        ids = batch.input_ids
        placeholders = torch.tensor(self.placeholder_ids, dtype=ids.dtype, device=ids.device)
        text = TextInputs(
            embeds=self.decoder.get_input_embeddings()(ids),  # (B, T, H)
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            placeholder=torch.isin(ids, placeholders),
            has_memory=self.has_memory(batch),
        )
        return self.conditioning.prepare(memory, text)

    def has_memory(self, batch: Batch) -> torch.Tensor:
        """(B,) bool: the rows whose memory holds something to read: a medium the model
        encodes, or any row when the model encodes the prompt."""
        rows = torch.zeros(len(batch), dtype=torch.bool, device=batch.input_ids.device)
        if "text" in self.encoders:
            return ~rows
        if "image" in self.encoders:
            rows = rows | batch.has_image.to(rows.device)
        if "audio" in self.encoders:
            rows = rows | batch.has_audio.to(rows.device)
        return rows

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns logits (B, L, V) and the aligned labels (B, L) (not yet shifted).

        With ``row_groups`` > 1 the logits of positions outside a row's group span are
        0; they are padding, without a label.
        """
        inputs = self.prepare_inputs(batch)
        groups = row_groups(inputs.attention_mask, self.row_groups)
        if len(groups) == 1:
            return self._decode(inputs), inputs.labels
        batch_size, length = inputs.attention_mask.shape
        logits = None
        for rows, start, stop in groups:
            part = self._decode(_select(inputs, rows, start, stop))  # (N, stop-start, V)
            if logits is None:
                logits = part.new_zeros(batch_size, length, part.shape[-1])
            logits[rows, start:stop] = part  # in place: no copy of the whole batch
        return logits, inputs.labels

    def _decode(self, inputs: DecoderInputs) -> torch.Tensor:
        """The decoder's logits (B, L, V) for ``inputs``."""
        with conditioned(self.decoder, inputs.memory):
            out = self.decoder(
                inputs_embeds=inputs.embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                use_cache=False,
            )
        return out.logits


def _select(inputs: DecoderInputs, rows: torch.Tensor, start: int, stop: int) -> DecoderInputs:
    """The decoder inputs of ``rows`` (N,) at positions ``[start, stop)``. Slots are shifted
    by ``start``; all a row attends to lies in the span, so the slots left out of it are
    padding."""
    span = slice(start, stop)
    slots = None if inputs.memory_slots is None else inputs.memory_slots[rows] - start
    return DecoderInputs(
        embeds=inputs.embeds[rows, span],
        attention_mask=inputs.attention_mask[rows, span],
        position_ids=inputs.position_ids[rows, span],
        labels=inputs.labels[rows, span],
        token_slots=inputs.token_slots[rows] - start,
        memory_slots=slots,
        memory=None if inputs.memory is None else inputs.memory.index_select(rows),
    )
