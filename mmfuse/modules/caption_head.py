"""A shallow captioning decoder that reads an encoder's tokens directly (CapPa-style).

Tschannen et al. (2023), "Image Captioners Are Scalable Vision Learners Too", pretrain a
vision encoder by captioning with a light text decoder. Each text position cross-attends to
the encoder tokens itself, so a word is one attention step away from the pixels it names
("a red" -> the red tokens -> "circle"): the encoder gets a direct, fine-grained signal that
the long path through fusion and a language model gives it only slowly.
"""

from __future__ import annotations

import torch
from torch import nn


class CaptionHead(nn.Module):
    """Token embedding + learned positions + pre-norm transformer decoder + vocabulary head.

    Args:
        vocab_size: tokenizer size.
        d_model: width of the encoder tokens it reads (and of itself).
        num_layers: decoder layers (self-attention, cross-attention to the tokens, MLP).
        num_heads: attention heads.
        max_length: longest text it reads.
        mlp_ratio: MLP width over ``d_model``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int = 1,
        num_heads: int = 4,
        max_length: int = 128,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Parameter(torch.randn(max_length, d_model) * 0.02)
        layer = nn.TransformerDecoderLayer(
            d_model,
            num_heads,
            int(d_model * mlp_ratio),
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(d_model))
        self.head = nn.Linear(d_model, vocab_size)

    def forward(
        self, tokens: torch.Tensor, token_mask: torch.Tensor, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """tokens (B, N, D) + token_mask (B, N) True = valid, input_ids (B, L) -> logits
        (B, L, V); position t predicts token t+1."""
        length = input_ids.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"caption of {length} tokens; max_length {self.positions.shape[0]}")
        h = self.embed(input_ids) + self.positions[:length]  # (B, L, D)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=h.device)
        h = self.layers(
            h,
            tokens,
            tgt_mask=causal,
            tgt_is_causal=True,
            memory_key_padding_mask=~token_mask,
        )
        return self.head(h)
