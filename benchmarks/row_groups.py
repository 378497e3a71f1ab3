"""Row groups (``model.row_groups``, ``mmfuse/row_groups.py``): the decoder run over groups of
rows of similar length instead of one padded batch.

Builds the demo model (``experiment=demo``, random weights, seed 0) and its first
``--batches`` real training batches, then times forward and backward over all of them with
``row_groups=1`` and with the demo's setting, side by side over ``--repeats`` rounds. Prints
the median step of each, the ratio, the share of the decoder's positions each runs over and
the largest loss difference between the two (the same function: float rounding only).

Needs the built-in world in data/world (``make demo`` makes it).

    .venv/bin/python -m benchmarks.row_groups [--batches 8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    BENCH_DIR,
    alternate,
    build_model,
    compose_train,
    median,
    train_batches,
)
from mmfuse.allocator import keep_freed_memory
from mmfuse.loss import next_token_loss
from mmfuse.row_groups import row_groups


def measure(batches: int, repeats: int, overrides=("experiment=demo",)) -> dict[str, float]:
    """Step times (ms) with one padded batch and with row groups, their decoder positions
    (share of the padded batch's) and the largest loss difference."""
    cfg = compose_train(list(overrides), BENCH_DIR / "work-row-groups")
    processor, model = build_model(cfg, seed=0)
    grouped = model.row_groups
    if grouped < 2:
        raise ValueError(f"the model's row_groups is {grouped}: nothing to compare")
    model.eval()  # no dropout: both settings compute the same losses
    data = train_batches(cfg, processor, batches)
    masks = []
    with torch.no_grad():
        for batch in data:
            masks.append(model.prepare_inputs(batch).attention_mask)
    padded = sum(mask.numel() for mask in masks)
    kept = sum(
        len(group.rows) * (group.stop - group.start)
        for mask in masks
        for group in row_groups(mask, grouped)
    )

    def steps(groups: int):
        def call() -> list[float]:
            model.row_groups = groups
            losses = []
            for batch in data:
                model.zero_grad(set_to_none=True)
                loss, _ = next_token_loss(*model(batch))
                loss.backward()
                losses.append(float(loss.detach()))
            return losses

        return call

    one, some = steps(1), steps(grouped)
    diff = max(abs(a - b) for a, b in zip(one(), some(), strict=True))
    times = alternate({"one": one, "grouped": some}, 1, repeats)
    model.row_groups = grouped
    return {
        "row_groups": grouped,
        "one_ms": median(times["one"]) * 1000 / len(data),
        "grouped_ms": median(times["grouped"]) * 1000 / len(data),
        "positions_share": kept / padded,
        "max_loss_diff": diff,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    r = measure(args.batches, args.repeats)
    print(f"demo model, {args.batches} training batches, {args.threads} thread(s)")
    print(f"forward+backward per batch: one padded batch {r['one_ms']:.1f} ms, "
          f"{r['row_groups']} row groups {r['grouped_ms']:.1f} ms, "
          f"x{r['one_ms'] / r['grouped_ms']:.2f}")  # fmt: skip
    print(f"decoder positions run: {r['positions_share']:.2f} of the padded batches'")
    print(f"losses, max abs difference: {r['max_loss_diff']:.2g}")


if __name__ == "__main__":
    main()
