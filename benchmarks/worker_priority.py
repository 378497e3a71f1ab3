"""Loader workers' priority (``data.worker_nice``): the training step next to a worker that
decodes the next batch.

Builds the demo model (``experiment=demo``, random weights, seed 0) and times training
steps as a fit runs them: each takes the next batch from a real training loader, then runs
forward and backward (on one fixed batch, so the model's work is the same in every setting).
The loaders compared, side by side over ``--repeats`` rounds of ``--steps`` steps:

- ``no_loader``: the forward and backward alone (the floor);
- ``in_process``: ``num_workers=0``, decoding between steps;
- ``nice_0``, ``nice_19``: one worker process at that niceness, decoding while the model runs.

Prints the median step of each and its ratio to the floor.

Needs the built-in world in data/world (``make demo`` makes it).

    .venv/bin/python -m benchmarks.worker_priority [--steps 12] [--repeats 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

import torch

from benchmarks.common import (
    BENCH_DIR,
    alternate,
    build_datamodule,
    build_model,
    compose_train,
    median,
    train_batches,
)
from mmfuse.allocator import keep_freed_memory
from mmfuse.loss import next_token_loss
from mmfuse.types import Batch

LOADERS = {"in_process": (0, 0), "nice_0": (1, 0), "nice_19": (1, 19)}
"""name: (num_workers, worker_nice)"""


def endless(loader) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def measure(steps: int, repeats: int, overrides=("experiment=demo",)) -> dict[str, float]:
    """{setting: median ms per step} for ``no_loader`` and every loader of ``LOADERS``."""
    cfg = compose_train(list(overrides), BENCH_DIR / "work-worker-priority")
    processor, model = build_model(cfg, seed=0)
    model.train()
    (batch,) = train_batches(cfg, processor, 1)
    feeds: dict[str, Iterator[Batch] | None] = {"no_loader": None}
    for name, (workers, nice) in LOADERS.items():
        module = build_datamodule(cfg, processor, num_workers=workers, worker_nice=nice)
        feeds[name] = endless(module.train_dataloader())

    def run(feed: Iterator[Batch] | None):
        def call() -> None:
            for _ in range(steps):
                if feed is not None:
                    next(feed)
                model.zero_grad(set_to_none=True)
                next_token_loss(*model(batch))[0].backward()

        return call

    times = alternate({name: run(feed) for name, feed in feeds.items()}, 1, repeats)
    return {name: median(values) * 1000 / steps for name, values in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    result = measure(args.steps, args.repeats)
    floor = result["no_loader"]
    print(f"demo model, training step with the next batch loaded, {args.threads} thread(s)")
    for name, ms in result.items():
        print(f"{name:>10}: {ms:6.1f} ms per step, x{ms / floor:.2f} of no loader")


if __name__ == "__main__":
    main()
