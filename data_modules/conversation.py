"""Conversation JSONL data sets and the LightningDataModule that serves them.

Bad records (``on_bad_record``): ``error`` stops at the first one with a ``RecordError``
naming the file, the record and the reason; ``skip`` hands out a ``SkippedRecord`` in its
place, which the collator leaves out of the batch (a batch may come out smaller; no record is
ever replaced by another), and ``data_modules.monitor.DataMonitor`` counts them by reason
and stops when more than ``max_skip_fraction`` of an epoch is bad.

The training order comes from ``data_modules.sampler`` (``sampler=random``, or
``length_grouped``: batches of records of similar token count and audio duration), resumable
mid-epoch and sharded over ranks. With ``cache_features`` the frozen encoders' features are
computed once (``mmfuse.feature_cache``) and read instead of the media.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data_modules.lengths import record_lengths
from data_modules.monitor import DataMonitor
from data_modules.sample_cache import SampleCache
from data_modules.sampler import (
    LengthGroupedSampler,
    ResumableDataLoader,
    ResumableSampler,
    SkippingDataLoader,
)
from data_modules.task_filter import select_tasks
from data_modules.turns import TURNS, split_at_answers
from mmfuse.allocator import keep_freed_memory
from mmfuse.feature_cache import build_store, cache_key, check_cacheable, check_not_augmented
from mmfuse.processing.collate import Collator
from mmfuse.processing.errors import REASONS, RecordError
from mmfuse.processing.processor import Processor
from mmfuse.types import Sample, SkippedRecord

log = logging.getLogger(__name__)

ON_BAD_RECORD = ("error", "skip")
SAMPLERS = ("random", "length_grouped")


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

    Picklable (DataLoader workers, also persistent ones, get a copy).

    Args:
        path: the JSONL file; media paths inside are relative to its directory.
        processor: record -> Sample.
        for_generation: keep the last assistant turn out of the input, as the reference.
        drop_modalities: media kinds to remove from every record.
        tasks: keep only the records of these tasks (``data_modules.task_filter``).
        on_bad_record: ``error`` (raise ``RecordError``) or ``skip`` (return a
            ``SkippedRecord`` in the sample's place).
        augment: apply the processor's training augmentation, seeded by (``seed``, the
            epoch the sampler drew the index for, the index): the same in any worker, and
            again after a resume.
        seed: augmentation seed.
        turns: ``whole`` (one sample per record), ``each``, ``each_alone`` or
            ``each_both`` (one per answer, with or without the turns before it, or both:
            ``data_modules.turns``).
        sample_cache_mb: keep up to this many MB of processed samples in memory (per
            process: each loader worker has its own), so that later epochs neither tokenise
            nor decode media again (``data_modules.sample_cache``); augmented samples are
            made anew every time.
    """

    def __init__(
        self,
        path: str | Path,
        processor: Processor,
        for_generation: bool = False,
        drop_modalities: Sequence[str] = (),
        tasks: Sequence[str] | None = None,
        on_bad_record: str = "error",
        augment: bool = False,
        seed: int = 0,
        turns: str = "whole",
        sample_cache_mb: float = 0,
    ) -> None:
        if turns not in TURNS:
            raise ValueError(f"data.turns must be one of {TURNS}, got {turns!r}")
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(
                f"data.on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}"
            )
        self.path = Path(path)
        self.records = read_jsonl(self.path)
        if tasks:
            self.records = select_tasks(self.records, tasks, self.path)
        if turns != "whole":
            self.records = split_at_answers(self.records, turns)
        self.last_answer_only = turns != "whole"
        self.processor = processor
        self.for_generation = for_generation
        self.drop_modalities = tuple(drop_modalities)
        self.on_bad_record = on_bad_record
        self.augment = augment
        self.seed = seed
        self.features = None  # a mmfuse.feature_cache.FeatureStore, set by the data module
        self.cache = SampleCache(int(sample_cache_mb * 2**20))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | SkippedRecord:
        position = int(index)
        record = self.records[position]
        if self.augment and self.processor.augments:  # made anew: each epoch differs
            augment_seed = _augment_seed(self.seed, getattr(index, "epoch", 0), position)
            return self._process(record, position, augment_seed)
        if not self.cache.max_bytes:
            return self._process(record, position, None)
        sample = self.cache.get(position)
        if sample is None:
            sample = self._process(record, position, None)
            if isinstance(sample, Sample):  # a skipped record is counted again each epoch
                self.cache.put(position, sample)
        return sample

    def _process(
        self, record: dict, position: int, augment_seed: int | None
    ) -> Sample | SkippedRecord:
        try:
            return self.processor(
                record,
                base_dir=self.path.parent,
                source=str(self.path),
                for_generation=self.for_generation,
                drop_modalities=self.drop_modalities,
                augment_seed=augment_seed,
                features=self.features.get(position) if self.features is not None else None,
                last_answer_only=self.last_answer_only,
            )
        except RecordError as err:
            if self.on_bad_record == "error":
                raise
            log.debug("skipped: %s", err)
            return SkippedRecord(
                str(record.get("id", "<no id>")), str(self.path), err.reason, str(err)
            )


def _augment_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class ConversationDataModule(LightningDataModule):
    """Serves conversation JSONL files for training and validation.

    Args:
        processor: record -> Sample (gives the tokenizer's pad id too).
        train_path: training JSONL.
        val_path: validation JSONL or None.
        batch_size: training batch size per process.
        eval_batch_size: validation batch size per process.
        num_workers: loader worker processes (persistent across epochs when > 0).
        val_generate: add a second validation loader that generates answers.
        prepare: called once before set-up (e.g. to generate the built-in world).
        seed: seed of the training order (a new permutation each epoch, the same on every
            rank; each rank takes its share, see ``data_modules.sampler``) and of the
            training augmentation.
        shuffle: shuffle the training set (otherwise file order).
        tasks: train and validate on the records of these tasks only (names or wildcards,
            ``data_modules.task_filter``), e.g. ``[image/caption, audio/caption]``.
        turns: training samples of multi-turn records: ``whole``, ``each``,
            ``each_alone`` or ``each_both`` (``data_modules.turns``).
        on_bad_record: ``error`` or ``skip`` (see the module docstring).
        max_skip_fraction: with ``skip``, stop when more of an epoch's records are bad.
        sampler: ``random`` or ``length_grouped``.
        group_batches: with ``length_grouped``, global batches sorted together.
        audio_bucket_seconds: with ``length_grouped``, audio durations are grouped in steps
            of this many seconds before token counts (null: tokens only).
        cache_features: compute the frozen encoders' features once and read them from
            ``cache_dir`` (``mmfuse.feature_cache``).
        cache_dir: root of the feature cache.
        sample_cache_mb: keep up to this many MB of processed samples in memory, per data set
            and loader worker (``data_modules.sample_cache``): later epochs skip tokenising
            and decoding media. Not for augmented training samples.
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
        tasks: Sequence[str] | None = None,
        turns: str = "whole",
        on_bad_record: str = "error",
        max_skip_fraction: float = 0.1,
        sampler: str = "random",
        group_batches: int = 50,
        audio_bucket_seconds: float | None = 1.0,
        cache_features: bool = False,
        cache_dir: str = "data/feature_cache",
        sample_cache_mb: float = 0,
    ) -> None:
        super().__init__()
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(
                f"data.on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}"
            )
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if cache_features:
            check_not_augmented(processor)
        self.tasks = tasks
        self.turns = turns
        self.processor = processor
        self.train_path, self.val_path = train_path, val_path
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.val_generate = val_generate
        self.prepare = prepare
        self.seed, self.shuffle = seed, shuffle
        self.on_bad_record = on_bad_record
        self.max_skip_fraction = max_skip_fraction
        self.sampler = sampler
        self.group_batches = group_batches
        self.audio_bucket_seconds = audio_bucket_seconds
        self.cache_features = cache_features
        self.cache_dir = cache_dir
        self.sample_cache_mb = sample_cache_mb
        self._cache_keys: dict[str, str] = {}
        self._train_sampler: ResumableSampler | None = None
        pad_id = processor.tokenizer.pad_token_id
        size = processor.image.size
        self.train_collator = Collator(pad_id, "right", size)
        self.generate_collator = Collator(pad_id, "left", size)

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        common = {
            "tasks": self.tasks,
            "on_bad_record": self.on_bad_record,
            "sample_cache_mb": self.sample_cache_mb,
        }
        self.train_set = ConversationDataset(
            self.train_path,
            self.processor,
            augment=True,
            seed=self.seed,
            turns=self.turns,
            **common,
        )
        if self.val_path:
            self.val_set = ConversationDataset(self.val_path, self.processor, **common)
            self.val_generate_set = ConversationDataset(
                self.val_path, self.processor, for_generation=True, **common
            )
        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, DataMonitor) for c in trainer.callbacks):
            monitor = DataMonitor(self.max_skip_fraction, self._epoch_records, REASONS)
            trainer.callbacks.insert(0, monitor)  # before checkpointing: its state is current

    def _epoch_records(self) -> int:
        return self._train_sampler.num_samples if self._train_sampler is not None else 0

    def _attach_features(self, *datasets: ConversationDataset) -> None:
        """Points the data sets at the feature cache, filling what it lacks (needs the model:
        called when the loaders are made, after the model is on its device)."""
        if not self.cache_features:
            return
        model = self.trainer.lightning_module.model
        kinds = check_cacheable(model, self.processor)
        for kind in kinds:
            if kind not in self._cache_keys:
                loader = self.processor.image if kind == "image" else self.processor.audio
                self._cache_keys[kind] = cache_key(model.encoders[kind], loader.settings())
        trainer = self.trainer
        stores: dict[str, object] = {}
        for dataset in datasets:
            if dataset.features is not None:
                continue
            if str(dataset.path) not in stores:  # the two validation sets share one
                stores[str(dataset.path)] = build_store(
                    dataset.records,
                    dataset.path.parent,
                    model,
                    self.processor,
                    self.cache_dir,
                    rank=trainer.global_rank,
                    ranks=trainer.world_size,
                    barrier=trainer.strategy.barrier,
                    batch_size=self.eval_batch_size,
                    num_workers=self.num_workers,
                    keys=self._cache_keys,
                )
            dataset.features = stores[str(dataset.path)]
            dataset.cache.clear()  # samples kept so far were made without the features

    def _loader(self, dataset: Dataset, batch_size: int, collator: Collator, shuffle: bool):
        return SkippingDataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collator,
            worker_init_fn=_single_thread_worker,
        )

    def make_sampler(self, num_replicas: int = 1, rank: int = 0) -> ResumableSampler:
        """The training sampler ``data.sampler`` names, for ``num_replicas`` ranks."""
        common = {
            "num_replicas": num_replicas,
            "rank": rank,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }
        if self.sampler == "length_grouped":
            lengths = record_lengths(
                self.train_set.records,
                self.processor,
                self.train_set.path.parent,
                self.audio_bucket_seconds,
            )
            return LengthGroupedSampler(
                self.train_set, lengths, self.batch_size, self.group_batches, **common
            )
        return ResumableSampler(self.train_set, **common)

    def train_dataloader(self) -> ResumableDataLoader:
        """The training loader: resumable mid-epoch, sharded over ranks (Lightning keeps it)."""
        trainer = self.trainer
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        if trainer is not None:
            self._attach_features(self.train_set)
        sampler = self.make_sampler(shard.get("num_replicas", 1), shard.get("rank", 0))
        self._train_sampler = sampler
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
        if self.trainer is not None:
            self._attach_features(self.val_set, self.val_generate_set)
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
    keep_freed_memory()  # a spawned worker does not inherit the parent's settings
