"""Freed memory kept (``mmfuse.allocator``) against glibc's default ``malloc`` settings.

The setting belongs to a process, so each side runs in a fresh child process: the child
builds the demo model (``experiment=demo``, random weights, seed 0) and times, after warm-up,
the median over ``--repeats`` calls of

- ``feature_encoder``: the wav2vec2 feature encoder (the convolutions) on 16 one-second clips;
- ``prefill``: 16 conversations through the encoders, the fusion and the decoder's prompt
  pass, what ``mmfuse-serve`` runs when 16 requests join the batch (inference mode);
- ``train_step``: a training step on a batch of 32 (forward, loss, backward, AdamW).

The parent prints both sides and the ratio default / kept of each. With glibc's defaults a
block above the (growing) mmap threshold, and the free top of the heap, go back to the kernel
when freed, so every call faults in freshly zeroed pages again; see ``mmfuse/allocator.py``.

    .venv/bin/python -m benchmarks.allocator [--repeats 20] [--world data/world] [overrides]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import (
    BENCH_DIR,
    build_model,
    compose_train,
    make_optimizer,
    median,
    time_calls,
    train_batches,
)
from mmfuse.allocator import keep_freed_memory
from mmfuse.generation import decoder_step
from mmfuse.loss import next_token_loss

SETTINGS = ("default", "kept")
FIGURES = {
    "feature_encoder": "wav2vec2 feature encoder, 16 clips (ms)",
    "prefill": "prefill of 16 conversations (ms)",
    "train_step": "training step, batch of 32 (ms)",
}


def measure(
    world: str, repeats: int, threads: int, overrides: Sequence[str] = ("experiment=demo",)
) -> dict[str, float]:
    """Milliseconds of each figure in this process (under its current malloc settings), for
    the model of the train config with ``overrides``."""
    torch.set_num_threads(threads)
    work = BENCH_DIR / "work-allocator"
    data = [*overrides, "data=jsonl", f"data.train_path={Path(world) / 'train.jsonl'}"]
    cfg = compose_train([*data, "data.batch_size=32"], work)
    processor, model = build_model(cfg, seed=0)
    batch32 = train_batches(cfg, processor, 1)[0]
    batch16 = train_batches(compose_train([*data, "data.batch_size=16"], work), processor, 1)[0]
    features = model.encoders["audio"].backbone.feature_extractor

    @torch.inference_mode()
    def feature_encoder() -> None:
        features(batch16.audio_values)

    @torch.inference_mode()
    def prefill() -> None:
        inputs = model.prepare_inputs(batch16)
        decoder_step(model.decoder, inputs.embeds, inputs.attention_mask, inputs.position_ids, None)

    optimizer, _ = make_optimizer(model, cfg, total_steps=repeats + 4)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        next_token_loss(*model(batch32))[0].backward()
        optimizer.step()

    model.eval()
    result = {
        "feature_encoder": median(time_calls(feature_encoder, 3, repeats)),
        "prefill": median(time_calls(prefill, 3, repeats)),
    }
    model.train()
    result["train_step"] = median(time_calls(train_step, 2, max(3, repeats // 4)))
    return {name: seconds * 1000 for name, seconds in result.items()}


def run(
    world: str, repeats: int, threads: int, overrides: Sequence[str] = ("experiment=demo",)
) -> dict[str, dict[str, float]]:
    """Both settings, each measured in its own child process: {setting: {figure: ms}}."""
    results = {}
    for setting in SETTINGS:
        command = [sys.executable, "-m", "benchmarks.allocator", "--child", setting]
        command += ["--world", world, "--repeats", str(repeats), "--threads", str(threads)]
        command += list(overrides)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", default=["experiment=demo"], help="train config")
    args = parser.parse_args()
    if args.child:
        if args.child == "kept" and not keep_freed_memory():
            raise SystemExit("the malloc settings did not take (not glibc, or set by MALLOC_*)")
        print(json.dumps(measure(args.world, args.repeats, args.threads, args.overrides)))
        return
    results = run(args.world, args.repeats, args.threads, args.overrides)
    print(f"{'':42s} {'default':>9s} {'kept':>9s} {'default/kept':>13s}")
    for name, label in FIGURES.items():
        default, kept = results["default"][name], results["kept"][name]
        print(f"{label:42s} {default:9.1f} {kept:9.1f} {default / kept:13.2f}")


if __name__ == "__main__":
    main()
