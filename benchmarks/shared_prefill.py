"""The ``n`` choices of one request prefilled once (``RunningBatch.join(..., copies=[n])``)
against the same prompt prefilled ``n`` times in one batch (what ``mmfuse-serve`` did before).

    .venv/bin/python -m benchmarks.shared_prefill [--ckpt runs/demo/model] [--repeats 20]

Loads the model directory (the demo's by default; ``make bench`` builds the demo model with
random weights instead) and takes the load test's first image+audio prompt
(``serve_load.load_test_request``). For ``n`` of 2, 4 and 8 seeded sampling choices (seeds
0 to n-1) it times both prefills side by side, medians over ``--repeats`` rounds, and checks
that both give every choice the same first token. Prints each pair and its ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks.batcher_load import prompts
from benchmarks.common import alternate, median, trained_model_from_args
from mmfuse.generation import GenerationConfig
from mmfuse.model import MMFuseModel
from mmfuse.processing.collate import Collator
from mmfuse.processing.processor import Processor
from mmfuse.running_batch import RunningBatch
from mmfuse.types import Batch

CHOICES = (2, 4, 8)


def _image_and_audio(processor: Processor, world: Path):
    """The first of the load test's prompts that carries both an image and a sound."""
    for sample in prompts(processor, world, 16):
        if sample.image is not None and sample.audio is not None:
            return sample
    raise ValueError(f"{world}: none of the first 16 test records has both an image and audio")


def _prefill(
    model: MMFuseModel, batch: Batch, configs: list[GenerationConfig], copies: list[int] | None
) -> Callable[[], list[int]]:
    """A fresh ``RunningBatch`` joined by ``batch``; returns the first tokens."""
    return lambda: RunningBatch(model).join(batch, configs, copies)


def measure(
    model: MMFuseModel, processor: Processor, world: str | Path, repeats: int
) -> dict[str, float | bool]:
    """``shared_<n>_ms``, ``repeated_<n>_ms`` and ``same_first_tokens_<n>`` for each ``n``
    of ``CHOICES``, on ``model`` (eval mode)."""
    collator = Collator(processor.tokenizer.pad_token_id, "left", processor.image.size)
    sample = _image_and_audio(processor, Path(world))
    result: dict[str, float | bool] = {}
    for n in CHOICES:
        configs = [GenerationConfig(max_new_tokens=8, do_sample=True, seed=i) for i in range(n)]
        once, repeated = collator([sample]), collator([sample] * n)

        fns = {
            "shared": _prefill(model, once, configs, [n]),
            "repeated": _prefill(model, repeated, configs, None),
        }
        for name, values in alternate(fns, 2, repeats).items():
            result[f"{name}_{n}_ms"] = median(values) * 1000
        result[f"same_first_tokens_{n}"] = fns["shared"]() == fns["repeated"]()
    return result


def main() -> None:
    args, model, processor = trained_model_from_args(__doc__.splitlines()[0])
    result = measure(model, processor, args.world, args.repeats)
    print(f"{args.ckpt}, {args.threads} thread(s), median of {args.repeats} rounds")
    for n in CHOICES:
        shared, repeated = result[f"shared_{n}_ms"], result[f"repeated_{n}_ms"]
        same = "same" if result[f"same_first_tokens_{n}"] else "DIFFERENT"
        print(
            f"n={n}: one prefill copied {shared:6.2f} ms, {n} prefills in a batch "
            f"{repeated:6.2f} ms, x{repeated / shared:.2f} ({same} first tokens)"
        )


if __name__ == "__main__":
    main()
