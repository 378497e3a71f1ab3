"""What the data did each epoch: skipped records by reason, truncated conversations and
padding efficiency; and the stop when too many records are bad.

``ConversationDataModule`` adds a :class:`DataMonitor` to the trainer in ``setup``. It reads
every batch in the main process (``Batch.skipped``, ``Batch.truncated``, the masks), so it
counts what worker processes skipped too. At each epoch end it sums the counts over the
ranks, writes them to the Python log and to the Lightning loggers:

- ``data/skipped`` and ``data/skipped/<reason>`` (reasons of ``processing.errors``, spaces as
  underscores), ``data/skipped_fraction``; the same under ``val_data/`` for validation;
- ``data/truncated``: records whose oldest turns were dropped to fit ``max_length``;
- ``data/padding_efficiency``: real tokens over all token positions of the training batches
  (1.0 = no padding), and ``data/audio_padding_efficiency`` for the waveforms.

It raises when the skipped fraction of an epoch passes ``data.max_skip_fraction`` (at once on
one process, when the count already passes the fraction of the whole epoch).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from mmfuse.types import Batch

log = logging.getLogger(__name__)


class TooManyBadRecords(RuntimeError):
    """More records were skipped than ``data.max_skip_fraction`` allows."""


class _Counts:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.records = 0  # records handed out (good and skipped)
        self.skipped: Counter[str] = Counter()
        self.truncated = 0
        self.tokens = 0
        self.positions = 0
        self.samples = 0
        self.sample_positions = 0

    def add(self, batch: Batch) -> None:
        self.records += len(batch) + len(batch.skipped)
        self.skipped.update(item.reason for item in batch.skipped)
        self.truncated += int(batch.truncated)
        self.tokens += int(batch.attention_mask.sum())
        self.positions += batch.attention_mask.numel()
        rows = batch.audio_lengths > 0
        if bool(rows.any()):
            self.samples += int(batch.audio_lengths.sum())
            self.sample_positions += int(rows.sum()) * batch.audio_values.shape[1]

    def state(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "skipped": dict(self.skipped),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "positions": self.positions,
            "samples": self.samples,
            "sample_positions": self.sample_positions,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.reset()
        for key, value in state.items():
            setattr(self, key, Counter(value) if key == "skipped" else int(value))


class DataMonitor(Callback):
    """Counts skipped and truncated records and padding per epoch (see the module docstring).

    Args:
        max_skip_fraction: the largest fraction of an epoch's records that may be skipped.
        epoch_records: records one rank gets in a whole training epoch (for the early stop).
        reasons: reasons always logged (as 0 when none was skipped), e.g. all of them.
    """

    def __init__(
        self,
        max_skip_fraction: float = 0.1,
        epoch_records: Callable[[], int] | None = None,
        reasons: tuple[str, ...] = (),
    ) -> None:
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.max_skip_fraction = max_skip_fraction
        self.epoch_records = epoch_records
        self.reasons = reasons
        self.train = _Counts()
        self.val = _Counts()
        self.epoch = -1  # the training epoch self.train counts

    @property
    def state_key(self) -> str:
        return "DataMonitor"

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train": self.train.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = int(state_dict.get("epoch", -1))
        self.train.load(state_dict.get("train", {}))

    # ------------------------------------------------------------------ training

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, Batch):
            return
        if self.epoch != trainer.current_epoch:
            self.train.reset()
            self.epoch = trainer.current_epoch
        self.train.add(batch)
        if trainer.world_size == 1 and self.epoch_records is not None and batch.skipped:
            total = self.epoch_records()
            skipped = sum(self.train.skipped.values())
            if total and skipped > self.max_skip_fraction * total:
                raise TooManyBadRecords(
                    self._message("training", skipped, total, self.train.skipped, early=True)
                )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.epoch != trainer.current_epoch:  # nothing was counted (no Batch objects)
            return
        self._report(trainer, pl_module, self.train, "data", "training")
        self.train.reset()
        self.epoch = -1

    # ---------------------------------------------------------------- validation

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.val.reset()

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # the generation loader serves the same records again: count the first loader only
        if isinstance(batch, Batch) and dataloader_idx == 0 and not trainer.sanity_checking:
            self.val.add(batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.val.records and not trainer.sanity_checking:
            self._report(trainer, pl_module, self.val, "val_data", "validation", padding=False)

    # ------------------------------------------------------------------- helpers

    def _report(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        counts: _Counts,
        prefix: str,
        stage: str,
        padding: bool = True,
    ) -> None:
        reasons = sorted(set(self.reasons) | set(counts.skipped))
        values = [
            counts.records,
            counts.truncated,
            counts.tokens,
            counts.positions,
            counts.samples,
            counts.sample_positions,
            *(counts.skipped.get(r, 0) for r in reasons),
        ]
        if trainer.world_size > 1:  # the same reasons on every rank: all of them are listed
            summed = trainer.strategy.reduce(
                torch.tensor(values, dtype=torch.float64, device=pl_module.device),
                reduce_op="sum",
            )
            values = [int(v) for v in summed.tolist()]
        records, truncated, tokens, positions, samples, sample_positions = values[:6]
        skipped = dict(zip(reasons, values[6:], strict=True))
        total_skipped = sum(skipped.values())
        fraction = total_skipped / records if records else 0.0
        metrics = {
            f"{prefix}/skipped": float(total_skipped),
            f"{prefix}/skipped_fraction": fraction,
            f"{prefix}/truncated": float(truncated),
        }
        metrics.update(  # reasons with records skipped (all are summed over ranks)
            {f"{prefix}/skipped/{r.replace(' ', '_')}": float(n) for r, n in skipped.items() if n}
        )
        if padding and positions:
            metrics[f"{prefix}/padding_efficiency"] = tokens / positions
        if padding and sample_positions:
            metrics[f"{prefix}/audio_padding_efficiency"] = samples / sample_positions
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        if total_skipped or truncated:
            log.warning(
                "%s epoch %d: %d of %d records skipped as bad (%s); %d conversations truncated "
                "to max_length (oldest turns dropped)",
                stage,
                trainer.current_epoch,
                total_skipped,
                records,
                ", ".join(f"{r}: {n}" for r, n in skipped.items() if n) or "none",
                truncated,
            )
        if padding and positions:
            log.info(
                "%s epoch %d: padding efficiency %.3f",
                stage,
                trainer.current_epoch,
                tokens / positions,
            )
        if fraction > self.max_skip_fraction:
            counter = Counter({r: n for r, n in skipped.items() if n})
            raise TooManyBadRecords(self._message(stage, total_skipped, records, counter))

    def _message(
        self, stage: str, skipped: int, total: int, counts: Counter, early: bool = False
    ) -> str:
        part = "of the epoch's" if early else "of"
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items()))
        return (
            f"{stage}: {skipped} {part} {total} records skipped as bad ({reasons}), more than "
            f"data.max_skip_fraction={self.max_skip_fraction}; fix the data (the errors name "
            "each record: data.on_bad_record=error) or raise data.max_skip_fraction"
        )
