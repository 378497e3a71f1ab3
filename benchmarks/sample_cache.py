"""Sample cache (``data.sample_cache_mb``, ``data_modules/sample_cache.py``): epochs after the
first without tokenising or decoding media.

Builds the demo model (``experiment=demo``, random weights, seed 0) and two in-process
training loaders (``num_workers=0``) over the first ``--records`` training records of the
built-in world, one without the cache and one with it. Times the loader alone per batch (the
first pass fills the cache, the second reads it), then whole training epochs (load, then
``benchmarks.overhead.PlainLoop``'s step: the Lightning module's optimiser, schedule,
clipping and loss), the two loaders taking turns, after an epoch each that fills the cache.
Prints both and their ratios.

Needs the built-in world in data/world (``make demo`` makes it).

    .venv/bin/python -m benchmarks.sample_cache [--records 640] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import (
    BENCH_DIR,
    alternate,
    build_datamodule,
    build_model,
    compose_train,
    median,
)
from benchmarks.overhead import PlainLoop
from mmfuse.allocator import keep_freed_memory


def measure(records: int, repeats: int, overrides=("experiment=demo",)) -> dict[str, float]:
    """Loader milliseconds per batch (without the cache; with it, filling and reading) and
    training steps per second with each loader, after the cache is full."""
    cfg = compose_train(list(overrides), BENCH_DIR / "work-sample-cache")
    processor, model = build_model(cfg, seed=0)
    loaders = {}
    for name, budget in (("plain", 0), ("cached", 4096)):
        datamodule = build_datamodule(cfg, processor, num_workers=0, sample_cache_mb=budget)
        datamodule.train_set.records = datamodule.train_set.records[:records]
        loaders[name] = datamodule.train_dataloader()
    steps = len(loaders["plain"])

    def pass_ms(loader) -> float:
        start = time.perf_counter()
        for _ in loader:
            pass
        return (time.perf_counter() - start) * 1000 / len(loader)

    plain_ms, filling_ms, reading_ms = (
        pass_ms(loaders["plain"]),
        pass_ms(loaders["cached"]),
        pass_ms(loaders["cached"]),
    )
    loop = PlainLoop(cfg, model, total_steps=steps * (2 * repeats + 2))

    def epoch(name: str):
        def call() -> None:
            for batch in loaders[name]:
                loop.step(batch)

        return call

    times = alternate({name: epoch(name) for name in loaders}, 1, repeats)
    return {
        "records": records,
        "batches": steps,
        "plain_load_ms": plain_ms,
        "filling_load_ms": filling_ms,
        "cached_load_ms": reading_ms,
        "plain_steps_per_s": steps / median(times["plain"]),
        "cached_steps_per_s": steps / median(times["cached"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=640)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    r = measure(args.records, args.repeats)
    print(f"demo model and data, {r['records']} records ({r['batches']} batches), "
          f"{args.threads} thread(s), loading in process")  # fmt: skip
    print(f"loading a batch: without the cache {r['plain_load_ms']:.1f} ms, filling it "
          f"{r['filling_load_ms']:.1f} ms, from it {r['cached_load_ms']:.1f} ms "
          f"(x{r['plain_load_ms'] / r['cached_load_ms']:.1f})")  # fmt: skip
    print(f"training epochs: without the cache {r['plain_steps_per_s']:.2f} steps/s, from it "
          f"{r['cached_steps_per_s']:.2f} steps/s "
          f"(x{r['cached_steps_per_s'] / r['plain_steps_per_s']:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
