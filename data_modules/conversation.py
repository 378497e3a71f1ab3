"""Conversation JSONL data sets and the LightningDataModule that serves them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data_modules.sampler import ResumableDataLoader, ResumableSampler
from mmfuse.processing.collate import Collator
from mmfuse.processing.processor import Processor
from mmfuse.types import Sample


def read_jsonl(path: str | Path) -> list[dict]:
    """Reads a conversation JSONL file; a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON: {err}") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a record must be a JSON object")
            record.setdefault("id", f"{path.name}:{number}")
            records.append(record)
    return records


class ConversationDataset(Dataset):
    """Records of one conversation JSONL file, processed on access.

    Args:
        path: the JSONL file; media paths inside are relative to its directory.
        processor: record -> Sample.
        for_generation: keep the last assistant turn out of the input, as the reference.
        drop_modalities: media kinds to remove from every record.
    """

    def __init__(
        self,
        path: str | Path,
        processor: Processor,
        for_generation: bool = False,
        drop_modalities: Sequence[str] = (),
    ) -> None:
        self.path = Path(path)
        self.records = read_jsonl(self.path)
        self.processor = processor
        self.for_generation = for_generation
        self.drop_modalities = tuple(drop_modalities)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.processor(
            self.records[index],
            base_dir=self.path.parent,
            source=str(self.path),
            for_generation=self.for_generation,
            drop_modalities=self.drop_modalities,
        )


class ConversationDataModule(LightningDataModule):
    """Serves conversation JSONL files for training and validation.

    Args:
        processor: record -> Sample (gives the tokenizer's pad id too).
        train_path: training JSONL.
        val_path: validation JSONL or None.
        batch_size: training batch size per process.
        eval_batch_size: validation batch size per process.
        num_workers: loader worker processes.
        val_generate: add a second validation loader that generates answers.
        prepare: called once before set-up (e.g. to generate the built-in world).
        seed: seed of the training order (a new permutation each epoch, the same on every
            rank; each rank takes its share, see ``data_modules.sampler``).
        shuffle: shuffle the training set (otherwise file order).
    """

    def __init__(
        self,
        processor: Processor,
        train_path: str,
        val_path: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        val_generate: bool = True,
        prepare: Callable[[], object] | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.processor = processor
        self.train_path, self.val_path = train_path, val_path
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.val_generate = val_generate
        self.prepare = prepare
        self.seed, self.shuffle = seed, shuffle
        pad_id = processor.tokenizer.pad_token_id
        size = processor.image.size
        self.train_collator = Collator(pad_id, "right", size)
        self.generate_collator = Collator(pad_id, "left", size)

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ConversationDataset(self.train_path, self.processor)
        if self.val_path:
            self.val_set = ConversationDataset(self.val_path, self.processor)
            self.val_generate_set = ConversationDataset(
                self.val_path, self.processor, for_generation=True
            )

    def _loader(self, dataset: Dataset, batch_size: int, collator: Collator, shuffle: bool):
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collator,
            worker_init_fn=_single_thread_worker,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        """The training loader: resumable mid-epoch, sharded over ranks (Lightning keeps it)."""
        trainer = self.trainer
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = ResumableSampler(
            self.train_set,
            num_replicas=shard.get("num_replicas", 1),
            rank=shard.get("rank", 0),
            shuffle=self.shuffle,
            seed=self.seed,
        )
        return ResumableDataLoader(
            self.train_set,
            sampler,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.train_collator,
            worker_init_fn=_single_thread_worker,
        )

    def val_dataloader(self) -> list[DataLoader]:
        if not self.val_path:
            return []
        loaders = [self._loader(self.val_set, self.eval_batch_size, self.train_collator, False)]
        if self.val_generate:
            loaders.append(
                self._loader(
                    self.val_generate_set, self.eval_batch_size, self.generate_collator, False
                )
            )
        return loaders


def _single_thread_worker(_: int) -> None:
    """Loader workers decode media; one thread each leaves the cores to the model."""
    torch.set_num_threads(1)
