"""A resumable training sampler and loader: a mid-epoch resume neither repeats nor skips a sample.

Lightning saves the ``state_dict()`` of every training DataLoader that has one (the
``_Stateful`` protocol) in the checkpoint's loop state (``loops.fit_loop.state_dict.
combined_loader``) and calls ``load_state_dict`` before it iterates again
(``FitLoop.setup_data``). :class:`ResumableDataLoader` implements that protocol: its state is
the epoch and the number of samples of that epoch already handed out, over all ranks.

:class:`ResumableSampler` is a ``DistributedSampler``, so Lightning leaves it in place
(``use_distributed_sampler`` only replaces samplers that are not) and the sharding is the
same one Lightning would inject: one permutation per epoch, seeded by ``seed + epoch``, rank
``r`` of ``W`` taking positions ``r, r + W, r + 2W, ...``. Step ``s`` of ``W`` ranks with
batch ``b`` therefore covers exactly positions ``[s*W*b, (s+1)*W*b)`` of the permutation: the
global batch one process with batch ``W*b`` sees at step ``s``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mmfuse.types import Batch

log = logging.getLogger(__name__)


class EpochIndex(int):
    """A dataset index that also carries the epoch it was drawn for (``.epoch``), so that a
    data set can seed per-epoch training augmentation from (seed, epoch, index) in whatever
    worker process it runs, and a resumed epoch draws the same augmentation again."""

    epoch: int

    def __new__(cls, index: int, epoch: int = 0) -> EpochIndex:
        value = super().__new__(cls, index)
        value.epoch = int(epoch)
        return value

    def __reduce__(self):
        return (EpochIndex, (int(self), self.epoch))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way in.

    Args:
        dataset: the training set.
        num_replicas: number of ranks (1 without distribution).
        rank: this rank.
        shuffle: a new seeded permutation every epoch.
        seed: permutation seed (the run's seed).
        drop_last: drop the tail that does not divide evenly over the ranks (otherwise the
            first indices are repeated to pad it, as ``DistributedSampler`` does).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0  # positions of this rank's share to skip in the next iteration

    def __iter__(self) -> Iterator[EpochIndex]:
        order = self.epoch_order()
        if not self.drop_last:  # repeat the first indices to divide evenly over the ranks
            padding = self.total_size - len(order)
            if padding <= len(order):
                order += order[:padding]
            else:
                order += (order * math.ceil(padding / len(order)))[:padding]
        else:
            order = order[: self.total_size]
        indices = order[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0
        return iter([EpochIndex(index, self.epoch) for index in indices[start:]])

    def epoch_order(self) -> list[int]:
        """The whole epoch's order (every rank computes the same): a permutation seeded by
        ``seed + epoch`` (``DistributedSampler``'s), or file order without ``shuffle``."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            return torch.randperm(len(self.dataset), generator=generator).tolist()
        return list(range(len(self.dataset)))

    # __len__ stays the whole epoch's share: Lightning counts a resumed epoch's batches from
    # the restored batch progress and expects the loader's full length.


class LengthGroupedSampler(ResumableSampler):
    """A resumable sampler whose batches hold records of similar length (less padding).

    Each epoch: the seeded permutation of :class:`ResumableSampler` is cut into groups of
    ``group_batches`` global batches (``batch_size * num_replicas`` positions each); each group
    is sorted by ``lengths`` (longest first) and cut into global batches; the full global
    batches are shuffled (seeded by the epoch), the one holding the longest record goes
    first (an out-of-memory shows at once) and a partial last batch stays last. The sharding,
    resume and epoch seeding are :class:`ResumableSampler`'s: rank ``r`` takes positions
    ``r, r + W, ...``, so every rank's batch at a step comes from the same sorted global
    batch.

    Args:
        dataset: the training set.
        lengths: one sort key per record (a number, or a tuple compared in order, e.g.
            (audio duration bucket, tokens): ``data_modules.lengths``).
        batch_size: samples per batch on each rank.
        group_batches: global batches sorted together; larger groups pad less but make the
            order less random.
        **kwargs: :class:`ResumableSampler` arguments.
    """

    def __init__(
        self,
        dataset: Dataset,
        lengths: Sequence[Any],
        batch_size: int,
        group_batches: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for a data set of {len(dataset)} records")
        if batch_size < 1 or group_batches < 1:
            raise ValueError("batch_size and group_batches must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_batches = group_batches

    def epoch_order(self) -> list[int]:
        order = super().epoch_order()
        width = self.batch_size * self.num_replicas  # one global batch
        group = width * self.group_batches
        batches: list[list[int]] = []
        for begin in range(0, len(order), group):
            chunk = sorted(order[begin : begin + group], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i : i + width] for i in range(0, len(chunk), width)]
        tail = [b for b in batches if len(b) < width]  # at most one, the last
        full = [b for b in batches if len(b) == width]
        if self.shuffle and full:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch + 7919)
            full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
            longest = max(range(len(full)), key=lambda i: self.lengths[full[i][0]])
            full.insert(0, full.pop(longest))
        return [index for batch in full + tail for index in batch]


class ResumableDataLoader(DataLoader):
    """A training DataLoader with Lightning's stateful-loader interface.

    The position counts the batches this loader has yielded in the current epoch, so
    batches prefetched by worker processes but not yet trained on are not counted.
    Worker seeds come from the loader's own generator, seeded with ``seed + epoch`` at each
    epoch, so iterating never draws from the global torch RNG (whose state the checkpoint
    restores for the model's dropout).

    With ``data.on_bad_record=skip`` a batch whose every record was bad is still yielded
    (empty: the training step skips it), so that the epoch has its full number of batches
    (Lightning schedules validation by it); with several ranks that is an error instead.

    Args:
        dataset: the training set.
        sampler: its resumable sampler.
        batch_size: samples per batch on this rank.
        **kwargs: other ``DataLoader`` arguments (``collate_fn``, ``num_workers``, ...).
    """

    def __init__(
        self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **kwargs: Any
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=torch.Generator(),
            **kwargs,
        )
        self._epoch = sampler.epoch
        self._seen = 0  # samples of this rank handed out in self._epoch
        self._pending: dict[str, int] | None = None  # a loaded state not yet iterated

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing runs until the first batch is asked for, by when Lightning has
        # called sampler.set_epoch() for the epoch it is about to run
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler
        epoch, start = sampler.epoch, 0
        if self._pending is not None:
            state, self._pending = self._pending, None
            if state["epoch"] == epoch:
                start = self._rank_start(state)
        self._epoch, self._seen = epoch, start
        sampler.start = start
        self.generator.manual_seed(sampler.seed + epoch)
        iterator = super().__iter__()
        try:
            for batch in iterator:
                self._seen = min(self._seen + self.batch_size, sampler.num_samples)
                if isinstance(batch, Batch) and len(batch) == 0 and sampler.num_replicas > 1:
                    # one process trains nothing this step (MMFuseLitModule skips an empty
                    # batch), but DDP ranks must all train every step
                    raise RuntimeError(
                        f"every record of a batch on rank {sampler.rank} was skipped as bad "
                        f"({_reasons(batch.skipped)}); with several ranks every rank must "
                        "train every step: fix or filter the data (mmfuse-convert --on-bad "
                        "skip) or use a larger data.batch_size"
                    )
                yield batch
        except Exception:
            # an error (a bad record in a worker): stop the workers now, not when the
            # traceback that holds this generator is collected (seconds of joins)
            if not self.persistent_workers and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            raise

    def _rank_start(self, state: dict[str, int]) -> int:
        sampler: ResumableSampler = self.sampler
        ranks = sampler.num_replicas
        if state["samples"] % ranks:
            log.warning(
                "resuming %d samples into epoch %d on %d ranks: not a multiple of the ranks, "
                "up to %d samples are repeated",
                state["samples"],
                state["epoch"],
                ranks,
                ranks - 1,
            )
        if state.get("seed", sampler.seed) != sampler.seed:
            log.warning(
                "resuming with seed %d, the checkpoint was written with seed %d: the epoch's "
                "order differs, so samples may repeat or be missed in this epoch",
                sampler.seed,
                state["seed"],
            )
        return min(state["samples"] // ranks, sampler.num_samples)

    def state_dict(self) -> dict[str, int]:
        """Epoch, samples of it handed out over all ranks, and the sampler seed."""
        if self._pending is not None:
            return dict(self._pending)
        sampler: ResumableSampler = self.sampler
        return {
            "epoch": self._epoch,
            "samples": self._seen * sampler.num_replicas,
            "seed": sampler.seed,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resumes at the saved position when the next iteration is of the saved epoch."""
        self._pending = {key: int(value) for key, value in state_dict.items()}
        self.sampler.set_epoch(self._pending["epoch"])


class SkippingDataLoader(DataLoader):
    """An evaluation DataLoader that leaves out batches whose every record was skipped as
    bad (their skipped records go with the next batch, ``Batch.skipped``)."""

    def __iter__(self) -> Iterator[Any]:
        pending: list = []
        for batch in super().__iter__():
            if isinstance(batch, Batch):
                if len(batch) == 0:
                    pending += batch.skipped
                    continue
                if pending:
                    batch.skipped, pending = pending + batch.skipped, []
            yield batch
        if pending:
            log.warning(
                "%d skipped records in evaluation batches that had no good record (%s)",
                len(pending),
                _reasons(pending),
            )


def _reasons(skipped: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for item in skipped:
        counts[item.reason] = counts.get(item.reason, 0) + 1
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
