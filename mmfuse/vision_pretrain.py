"""Stage 0 (optional): pretrain the vision encoder by captioning, before the main fit.

A vision encoder trained from scratch only through fusion and a language model learns what
the easy questions need (colours, counts, places) and very slowly anything finer: on the
built-in world it never learns to tell a circle from a square. Pretraining it with a shallow
captioning decoder (``CaptionHead``) on the text of the training records that hold an image
gives it those features in a few hundred steps, as pretrained vision towers (CLIP, CapPa) give
them to real multimodal models. The main fit then usually freezes it (``freeze.encoders.image``).

The caption of a record is its whole conversation text (questions and answers in order), so
any conversation data works; nothing beyond the training JSONL is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data_modules.conversation import read_jsonl
from mmfuse.modules.caption_head import CaptionHead
from mmfuse.modules.encoders import VisionEncoder
from mmfuse.optim import param_groups, warmup_cosine
from mmfuse.processing.processor import Processor
from mmfuse.processing.text import message_text

log = logging.getLogger(__name__)


@dataclass
class VisionPretrainConfig:
    """Settings of the captioning stage (``vision_pretrain:`` in the train config)."""

    steps: int = 800
    batch_size: int = 32
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    num_layers: int = 1
    num_heads: int = 4
    max_length: int = 128
    num_workers: int = 0


def image_text_pairs(records: list[dict], base_dir: Path) -> list[tuple[Path, str]]:
    """(image path, conversation text) for every record with an image part."""
    pairs = []
    for record in records:
        messages = record.get("messages") or []
        images = [
            part["path"]
            for message in messages
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part.get("type") == "image" and "path" in part
        ]
        text = " ".join(t for t in (message_text(m).strip() for m in messages) if t)
        if images and text:
            pairs.append((base_dir / images[0], text))
    return pairs


class CaptionDataset(Dataset):
    """(pixels (3, H, W), token ids ending with EOS) per image record."""

    def __init__(self, pairs: list[tuple[Path, str]], processor: Processor, max_length: int):
        self.pairs = pairs
        self.processor = processor
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, text = self.pairs[index]
        tokenizer = self.processor.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length - 1]
        return self.processor.image.load(path), torch.tensor([*ids, tokenizer.eos_token_id])


class CaptionPretrainModule(L.LightningModule):
    """Trains a vision encoder and a ``CaptionHead`` on (image, text) pairs."""

    def __init__(
        self, encoder: VisionEncoder, head: CaptionHead, config: VisionPretrainConfig, pad_id: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.config = config
        self.pad_id = pad_id

    def caption_loss(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W), ids (B, L) padded with ``pad_id`` -> mean next-token loss."""
        present = torch.ones(pixels.shape[0], dtype=torch.bool, device=pixels.device)
        tokens = self.encoder(pixels, present)  # (B, N, D)
        logits = self.head(tokens.feats, tokens.mask, ids[:, :-1])  # (B, L-1, V)
        targets = ids[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.pad_id)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = self.caption_loss(*batch)
        self.log("vision_pretrain/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            param_groups(self, self.config.weight_decay), lr=self.config.lr, betas=(0.9, 0.98)
        )
        schedule = warmup_cosine(
            optimizer, self.config.steps, warmup_ratio=self.config.warmup_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def pretrain_vision(
    encoder: VisionEncoder, processor: Processor, train_path: str | Path, **settings
) -> float:
    """Pretrains ``encoder`` in place by captioning the image records of ``train_path``.

    Returns:
        The last training loss.
    """
    config = VisionPretrainConfig(**settings)
    train_path = Path(train_path)
    pairs = image_text_pairs(read_jsonl(train_path), train_path.parent)
    if not pairs:
        raise ValueError(f"vision_pretrain: no record with an image and text in {train_path}")
    tokenizer = processor.tokenizer
    head = CaptionHead(
        len(tokenizer),
        encoder.proj.out_features,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        max_length=config.max_length,
    )
    pad_id = tokenizer.pad_token_id

    def collate(items):
        pixels, ids = zip(*items, strict=True)
        padded = torch.nn.utils.rnn.pad_sequence(list(ids), batch_first=True, padding_value=pad_id)
        # a leading EOS gives the first word a position to be predicted from
        start = torch.full((len(ids), 1), tokenizer.eos_token_id, dtype=padded.dtype)
        return torch.stack(pixels), torch.cat([start, padded], dim=1)

    loader = DataLoader(
        CaptionDataset(pairs, processor, config.max_length - 1),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        collate_fn=collate,
        drop_last=len(pairs) >= config.batch_size,
    )
    module = CaptionPretrainModule(encoder, head, config, pad_id)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=config.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    log.info("vision_pretrain: %d image records, %d steps", len(pairs), config.steps)
    trainer.fit(module, loader)
    loss = float(trainer.callback_metrics["vision_pretrain/loss"])
    log.info("vision_pretrain: final caption loss %.4f", loss)
    return loss
