"""Memory: peak resident memory of training steps, with and without gradient checkpointing.

Each variant runs in a child process of its own (``python -m benchmarks.memory``): torch's
allocations are invisible to ``tracemalloc``, and a process's peak never goes down. The
child reads its own peak from ``/proc/self/status`` (``VmHWM``, the peak resident set of
its address space): on Linux its ``ru_maxrss`` (and the parent's ``RUSAGE_CHILDREN``)
starts at the parent's peak, which ``exec`` carries over from the forked address space.

The child builds the model (``gradient_checkpointing.decoder`` and ``.encoders`` set),
loads the batches the parent saved (reading the data set itself would leave a higher peak
than the step's), notes its peak so far (the baseline), runs the training steps (forward,
backward, AdamW) and prints its peak and the losses as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import build_model, compose_train, make_optimizer
from mmfuse.loss import next_token_loss
from mmfuse.types import Batch

MB = 1024 * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` where ``/proc`` has it, otherwise
    ``ru_maxrss`` (kilobytes on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child(overrides: Sequence[str], checkpointing: bool, batches_path: str) -> dict:
    """The measurement inside the child process."""
    flag = str(checkpointing).lower()
    cfg = compose_train(
        [
            *overrides,
            f"gradient_checkpointing.decoder={flag}",
            f"gradient_checkpointing.encoders={flag}",
        ]
    )
    _, model = build_model(cfg)
    batches: list[Batch] = torch.load(batches_path, weights_only=False)
    optimizer, _ = make_optimizer(model, cfg, total_steps=len(batches))
    model.train()
    gc.collect()
    baseline = peak_rss_bytes()
    torch.manual_seed(int(cfg.seed))
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        logits, labels = model(batch)
        loss, _ = next_token_loss(logits, labels, batch.ids)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return {
        "checkpointing": checkpointing,
        "baseline_bytes": baseline,
        "peak_bytes": peak_rss_bytes(),
        "losses": losses,
        "batch_size": len(batches[0]),
    }


@dataclass
class MemoryResult:
    peak_mb: float
    step_mb: float  # peak minus the baseline before the first step
    losses: list[float]


def save_batches(batches: Sequence[Batch], path: str | Path) -> Path:
    """Writes the batches the children train on (the first step allocates the optimiser's
    state, the second is the steady step: two are enough)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(list(batches), path)
    return path


def measure_memory(
    overrides: Sequence[str],
    checkpointing: bool,
    batches_path: str | Path,
    threads: int | None = None,
) -> MemoryResult:
    """Runs :func:`child` in a fresh interpreter and reads its JSON line."""
    command = [sys.executable, "-m", "benchmarks.memory", "--batches", str(batches_path)]
    if checkpointing:
        command.append("--checkpointing")
    if threads:
        command += ["--threads", str(threads)]
    command += ["--", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return MemoryResult(
        result["peak_bytes"] / MB,
        (result["peak_bytes"] - result["baseline_bytes"]) / MB,
        result["losses"],
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one memory measurement (a child process)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--batches", required=True, help="file written by save_batches")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(child(args.overrides, args.checkpointing, args.batches)))


if __name__ == "__main__":
    main()
