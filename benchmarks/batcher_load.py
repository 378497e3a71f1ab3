"""The dynamic batcher alone, without HTTP: how its prefill grouping changes throughput.

    .venv/bin/python -m benchmarks.batcher_load --ckpt runs/demo/model

``--clients`` threads each submit the load test's requests (``serve_load.load_test_request``)
to one ``DynamicBatcher`` and wait for the answer before submitting the next (a closed loop),
``--requests`` in all. Each ``--groups`` value of ``batching.prefill_group`` is
run with ``--max-batch`` rows, and one-at-a-time generation (``max_batch_size=1``) beside
them, in turns for ``--rounds`` rounds; the median round of each is printed, with its
prefills (how many and their mean size), its ratio over one at a time, and how many of its
greedy answers differ from one-at-a-time generation's in any round (batched products may
round otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks.serve_load import load_test_request
from mmfuse.generation import GenerationConfig
from mmfuse.serve.batcher import DynamicBatcher, Job
from mmfuse.serve.engine import EngineSettings, build_batcher
from mmfuse.types import Sample


def prompts(processor, world: Path, n: int) -> list[Sample]:
    """The load test's first ``n`` requests, processed."""
    samples = []
    for i in range(n):
        media, question = load_test_request(world, i)
        content = [{"type": kind, "path": str(path)} for kind, path in media.items()]
        content.append({"type": "text", "text": question})
        samples.append(processor.prompt([{"role": "user", "content": content}]))
    return samples


def closed_loop(batcher: DynamicBatcher, samples: list[Sample], clients: int, max_tokens: int):
    """Every sample once, ``clients`` at a time; returns (seconds, answers in sample order)."""
    config = GenerationConfig(max_new_tokens=max_tokens)
    answers: list[str | None] = [None] * len(samples)
    indices = iter(range(len(samples)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(indices, None)
            if i is None:
                return
            answers[i] = batcher.submit(Job(samples[i], config)).result().text

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, answers


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """Requests/s (median round), prefills per round and their mean size, per configuration."""
    torch.set_num_threads(args.threads)
    runs = {"one at a time": (1, None)}
    runs.update({f"prefill_group={g}": (args.max_batch, g) for g in args.groups})
    batchers, samples, reference = {}, None, None
    for name, (max_batch, group) in runs.items():
        settings = EngineSettings(
            args.ckpt, threads=args.threads, max_batch_size=max_batch,
            max_wait_ms=args.max_wait_ms, prefill_group=group,
        )  # fmt: skip
        batchers[name], processor = build_batcher(settings)
        samples = samples or prompts(processor, Path(args.world), args.requests)
    results = {name: {"rates": [], "prefills": [], "differ": 0} for name in runs}
    try:
        for _ in range(args.rounds):
            for name, batcher in batchers.items():
                before = len(batcher.batch_sizes)
                seconds, answers = closed_loop(batcher, samples, args.clients, args.max_tokens)
                reference = reference or answers  # one at a time runs first
                pairs = zip(answers, reference, strict=True)
                differ = sum(a != b for a, b in pairs)
                results[name]["differ"] = max(results[name]["differ"], differ)
                results[name]["rates"].append(len(samples) / seconds)
                results[name]["prefills"].append(len(batcher.batch_sizes) - before)
    finally:
        for batcher in batchers.values():
            batcher.close()
    sequential = statistics.median(results["one at a time"]["rates"])
    return {
        name: {
            "requests_per_s": statistics.median(r["rates"]),
            "rounds": r["rates"],
            "prefills_per_round": statistics.median(r["prefills"]),
            "requests_per_prefill": args.requests / statistics.median(r["prefills"]),
            "over_one_at_a_time": statistics.median(r["rates"]) / sequential,
            "answers_differing": r["differ"],
        }
        for name, r in results.items()
    }


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/demo/model")
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-wait-ms", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results = measure(args)
    print(
        f"{args.requests} requests, {args.clients} clients, max batch {args.max_batch}, "
        f"max wait {args.max_wait_ms:g} ms, {args.threads} torch thread(s); median of "
        f"{args.rounds} rounds"
    )
    for name, r in results.items():
        rounds = ", ".join(f"{x:.0f}" for x in r["rounds"])
        print(
            f"{name:18s} {r['requests_per_s']:7.1f} req/s  (rounds: {rounds})  "
            f"{r['prefills_per_round']:5.0f} prefills of {r['requests_per_prefill']:4.1f}  "
            f"x{r['over_one_at_a_time']:.2f} over one at a time  "
            f"{r['answers_differing']} answers differ"
        )
    return results


if __name__ == "__main__":
    main()
