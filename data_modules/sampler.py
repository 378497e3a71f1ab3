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
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


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

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])

    # __len__ stays the whole epoch's share: Lightning counts a resumed epoch's batches from
    # the restored batch progress and expects the loader's full length.


class ResumableDataLoader(DataLoader):
    """A training DataLoader with Lightning's stateful-loader interface.

    The position counts the batches this loader has yielded in the current epoch, so
    batches prefetched by worker processes but not yet trained on are not counted.
    Worker seeds come from the loader's own generator, seeded with ``seed + epoch`` at each
    epoch, so iterating never draws from the global torch RNG (whose state the checkpoint
    restores for the model's dropout).

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
        for batch in super().__iter__():
            self._seen = min(self._seen + self.batch_size, sampler.num_samples)
            yield batch

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
