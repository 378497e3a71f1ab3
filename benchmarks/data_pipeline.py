"""Data pipeline: samples per second of the training loader alone against what training
consumes.

The loader is the configured one (``ConversationDataModule.train_dataloader``: its worker
processes, batch size and collation) on the real built-in world, iterated with nothing
else running; training consumes ``batch_size / step time`` samples per second (the Lightning
step of ``benchmarks.overhead`` on batches held in memory). The loader should be several
times faster than training needs, so that its worker never holds the model back even when
the two share the cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from omegaconf import DictConfig

from benchmarks.common import build_datamodule, median
from mmfuse.processing.processor import Processor


@dataclass
class LoaderResult:
    samples_per_s: float
    rates: list[float]
    first_batch_s: float
    num_workers: int
    batch_size: int


def loader_throughput(
    cfg: DictConfig,
    processor: Processor,
    batches: int,
    repeats: int,
    warmup: int = 2,
    **data_overrides,
) -> LoaderResult:
    """Samples per second of the configured training loader (``data_overrides`` change
    ``cfg.data``'s arguments, e.g. ``num_workers``): after ``warmup`` batches (the workers'
    start), ``repeats`` blocks of ``batches`` batches; the median block rate."""
    datamodule = build_datamodule(cfg, processor, **data_overrides)
    loader = datamodule.train_dataloader()
    needed = warmup + batches * repeats
    if len(loader) < needed:
        raise ValueError(f"the training set has {len(loader)} batches, {needed} needed")
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(iterator)
    rates = []
    for _ in range(repeats):
        start, samples = time.perf_counter(), 0
        for _ in range(batches):
            samples += len(next(iterator))
        rates.append(samples / (time.perf_counter() - start))
    iterator.close()
    workers = getattr(loader, "_iterator", None)  # persistent workers: stop them now
    if workers is not None and hasattr(workers, "_shutdown_workers"):
        workers._shutdown_workers()
    return LoaderResult(
        median(rates), rates, first, int(datamodule.num_workers), int(datamodule.batch_size)
    )
