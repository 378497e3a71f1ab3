"""Feature cache and length grouping: what they buy, measured side by side.

1. Frozen-encoder feature cache. The ``small`` preset (hybrid ViT + wav2vec2 encoders, small
   Llama decoder) with its encoder backbones frozen (``freeze=encoders``: their projections,
   the fusion and the decoder train), on batches of the built-in world. A training step
   (forward, loss, backward, AdamW step) on batches whose media go through the frozen
   encoders, against the same step on batches carrying the cached encoder features
   (``data.cache_features=true``). Both start from the same weights; their losses at step 0
   must agree to 1e-5. Timed two ways: the model step alone (batches collated beforehand),
   and the step with its data (decoding the PNG and WAV files and collating, against reading
   the cached features and collating). All timings are taken in one process, interleaved
   step by step after a warm-up; the minimum over repeats is reported (the least disturbed
   by other work on the machine), the median in brackets. The frozen encoders' own forward
   time is printed too: a step cannot get faster than by that. The same is then measured
   with larger frozen encoders (``LARGER_ENCODERS``) and the same small decoder, the case a
   cache is meant for (``--small-only`` skips it).
2. Length grouping. The padding efficiency (real tokens over all token positions) of one
   epoch of the world's training records (single and multi-turn conversations mixed) in
   batches of ``--batch-size``, with ``data.sampler=random`` and ``length_grouped``.

Usage::

    python benchmarks/feature_cache.py [--records 512] [--batch-size 32] [--steps 4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_modules.conversation import ConversationDataModule, ConversationDataset
from data_modules.sampler import ResumableDataLoader
from data_modules.world import WorldSize, generate_world
from mmfuse.config import CONFIG_DIR
from mmfuse.feature_cache import build_store
from mmfuse.freezing import apply_freezing
from mmfuse.loss import next_token_loss
from mmfuse.model_dir import build_processor_and_model
from mmfuse.optim import param_groups
from mmfuse.types import Batch

# frozen encoders of the sizes pretrained ones start at (ViT-S: 384 wide, 12 layers, at 64 px;
# a 12-layer wav2vec2 of the same width), with the same small decoder: the case a cache is for
LARGER_ENCODERS = [
    "model.vision.embed_dim=384",
    "model.vision.depth=12",
    "model.vision.num_heads=6",
    "model.audio.config.hidden_size=384",
    "model.audio.config.num_hidden_layers=12",
    "model.audio.config.num_attention_heads=6",
    "model.audio.config.intermediate_size=1536",
    "model.audio.config.conv_dim=[128,128,128,128]",
]


def _config(world: Path, out: Path, batch_size: int, extra: Sequence[str] = ()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "model=small",
                "freeze=encoders",
                "data=jsonl",
                f"data.train_path={world / 'train.jsonl'}",
                f"data.batch_size={batch_size}",
                "data.num_workers=0",
                f"paths.output_dir={out}",
                *extra,
            ],
        )


def _batches(dataset: ConversationDataset, collate, batch_size: int, count: int) -> list[Batch]:
    return [
        collate([dataset[i] for i in range(start, start + batch_size)])
        for start in range(0, count * batch_size, batch_size)
    ]


def _step(model, optimizer) -> Callable[[Batch], float]:
    def run(batch: Batch) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = next_token_loss(*model(batch))
        loss.backward()
        optimizer.step()
        return float(loss)

    return run


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def feature_cache(
    label: str,
    extra: Sequence[str],
    world: Path,
    work: Path,
    batch_size: int,
    steps: int,
    repeats: int,
) -> dict[str, float]:
    """Times cached against recomputed frozen encoders; prints the figures and returns them:
    ``step_speedup`` (model step), ``load_speedup`` (step with its data), ``loss_diff`` (at
    step 0) and ``encoder_share`` (the frozen encoders' part of an uncached step)."""
    cfg = _config(world, work, batch_size, extra)
    torch.manual_seed(0)
    processor, model = build_processor_and_model(cfg)
    apply_freezing(model, OmegaConf.to_container(cfg.freeze, resolve=True))
    model.train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    plain = ConversationDataset(world / "train.jsonl", processor)
    cached = ConversationDataset(world / "train.jsonl", processor)
    start = time.perf_counter()
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # a fresh one: fill timed
    cached.features = build_store(cached.records, world, model, processor, cache_dir)
    fill = time.perf_counter() - start
    collate = ConversationDataModule(processor, str(world / "train.jsonl")).train_collator

    # loss at step 0: same weights, same records
    first_plain = _batches(plain, collate, batch_size, 1)[0]
    first_cached = _batches(cached, collate, batch_size, 1)[0]
    losses = []
    for batch in (first_plain, first_cached):
        model.load_state_dict(initial)
        torch.manual_seed(0)
        losses.append(float(next_token_loss(*model(batch))[0].detach()))

    model.load_state_dict(initial)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01, {}, 1e-4), lr=1e-4)
    step = _step(model, optimizer)
    data_plain = _batches(plain, collate, batch_size, steps)
    data_cached = _batches(cached, collate, batch_size, steps)
    for batch in data_plain[:1] + data_cached[:1]:  # warm-up
        step(batch)

    def loaded(dataset: ConversationDataset, index: int) -> Batch:
        """Batch ``index`` read from the files (or the cache) and collated, as a loader does."""
        return collate([dataset[i] for i in range(index * batch_size, (index + 1) * batch_size)])

    runs: dict[str, Callable[[int], object]] = {
        "encoders": lambda i: _encode_only(model, data_plain[i]),
        "model": lambda i: step(data_plain[i]),
        "model+cache": lambda i: step(data_cached[i]),
        "all": lambda i: step(loaded(plain, i)),
        "all+cache": lambda i: step(loaded(cached, i)),
    }
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats * steps):  # interleaved step by step: load drifts hit all
        for name, run in runs.items():
            start = time.perf_counter()
            run(round_ % steps)
            timings[name].append(time.perf_counter() - start)
    # the minimum: the least disturbed by other work on the machine (medians in brackets)
    t = {name: min(values) for name, values in timings.items()}
    med = {name: statistics.median(values) for name, values in timings.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"== frozen-encoder feature cache: {label} (freeze=encoders, fp32, CPU) ==")
    print(
        f"{frozen:,} frozen and {trainable:,} trainable parameters; batch {batch_size}, "
        f"{steps} steps x {repeats} repeats, {torch.get_num_threads()} threads"
    )
    print(f"cache fill (once): {len(cached.records)} records in {fill:.2f} s")
    print(
        f"loss at step 0: encoders {losses[0]:.7f}  cached {losses[1]:.7f}  "
        f"|diff| {abs(losses[0] - losses[1]):.2e}  (required < 1e-5)"
    )
    print(
        f"frozen encoders' forward: {t['encoders'] * 1e3:.1f} ms per batch "
        f"({t['encoders'] / t['model']:.0%} of the step without the cache)"
    )
    for name, what in (("model", "model step:         "), ("all", "step with data load:")):
        print(
            f"{what}  encoders {t[name] * 1e3:7.1f} ms [{med[name] * 1e3:7.1f}]  cached "
            f"{t[name + '+cache'] * 1e3:7.1f} ms [{med[name + '+cache'] * 1e3:7.1f}]  speed-up "
            f"{t[name] / t[name + '+cache']:.2f}x [{med[name] / med[name + '+cache']:.2f}x]"
        )
    return {
        "step_speedup": t["model"] / t["model+cache"],
        "load_speedup": t["all"] / t["all+cache"],
        "loss_diff": abs(losses[0] - losses[1]),
        "encoder_share": t["encoders"] / t["model"],
    }


@torch.no_grad()
def _encode_only(model, batch: Batch) -> None:
    model.encoders["image"](batch.pixel_values, batch.has_image)
    model.encoders["audio"](batch.audio_values, batch.audio_lengths)


def length_grouping(world: Path, batch_size: int) -> dict[str, float]:
    """Padding efficiency of one epoch per sampler, printed and returned by sampler name."""
    cfg = _config(world, world.parent / "length-grouping", batch_size)
    processor, _ = build_processor_and_model(cfg)
    print(f"== length grouping (the world's training records, batch {batch_size}) ==")
    results = {}
    for sampler in ("random", "length_grouped"):
        module = ConversationDataModule(
            processor, str(world / "train.jsonl"), batch_size=batch_size, sampler=sampler
        )
        module.setup("fit")
        loader = ResumableDataLoader(
            module.train_set,
            module.make_sampler(),
            batch_size=batch_size,
            collate_fn=module.train_collator,
        )
        loader.sampler.set_epoch(0)
        real = positions = 0
        for batch in loader:
            real += int(batch.attention_mask.sum())
            positions += batch.attention_mask.numel()
        results[sampler] = real / positions
        print(
            f"data.sampler={sampler:15s} padding efficiency {real / positions:.3f} "
            f"({real:,} real tokens in {positions:,} positions)"
        )
    print(
        f"token positions saved by grouping: "
        f"{1 - results['random'] / results['length_grouped']:.1%}"
    )
    return results


CONFIGS = {
    "small": ("the small preset", []),
    "vit_s": ("small preset, ViT-S-sized encoders (384 wide, 12 layers)", LARGER_ENCODERS),
}


def run(
    repeats: int = 3,
    records: int = 512,
    batch_size: int = 32,
    steps: int = 4,
    small_only: bool = False,
    work: Path | None = None,
) -> dict[str, float]:
    """Both measurements on a freshly generated world of ``records`` training records.

    Returns ``<config>.step_speedup``, ``<config>.load_speedup``, ``<config>.loss_diff`` and
    ``<config>.encoder_share`` for the configs ``small`` and (unless ``small_only``)
    ``vit_s``, and ``padding.random`` and ``padding.length_grouped``. ``work``: where the
    world and the caches go (default: a temporary directory, removed at the end).
    """
    if steps * batch_size > records:
        raise ValueError("steps x batch_size must not exceed records")
    if work is None:  # a temporary world and cache, removed afterwards
        with tempfile.TemporaryDirectory(prefix="mmfuse-feature-cache-") as tmp:
            return run(repeats, records, batch_size, steps, small_only, Path(tmp))
    world = work / "world"
    size = WorldSize(n_train=records, n_val_per_task=1, n_test_per_task=1)
    generate_world(world, seed=0, size=size, workers=1)
    figures: dict[str, float] = {}
    for name, (label, extra) in CONFIGS.items():
        if small_only and name != "small":
            continue
        result = feature_cache(label, extra, world, work, batch_size, steps, repeats)
        figures.update({f"{name}.{key}": value for key, value in result.items()})
    padding = length_grouping(world, batch_size)
    figures.update({f"padding.{sampler}": value for sampler, value in padding.items()})
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=512, help="world training records")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="different batches timed")
    parser.add_argument("--repeats", type=int, default=3, help="times each batch is timed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--small-only", action="store_true", help="skip the larger encoders")
    parser.add_argument("--work", type=Path, default=None, help="directory for world and cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args.repeats, args.records, args.batch_size, args.steps, args.small_only, args.work)
    except ValueError as err:
        sys.exit(str(err))


if __name__ == "__main__":
    main()
