"""oneDNN for large inference products (``mmfuse/modules/onednn_linear.py``) against
``F.linear`` (MKL) on the same model.

    .venv/bin/python -m benchmarks.onednn_linear [--ckpt runs/demo/model] [--threads 1]

Loads the model directory (the demo's by default; ``make bench`` builds the demo model with
random weights instead) and processes the load test's prompts
(``serve_load.load_test_request``: the world's test records and questions). Times, side by
side (the model switched between ``OneDNNLinear`` and ``nn.Linear`` before each call), the
medians over ``--repeats`` rounds of

- ``prefill_<n>``: a prefill of ``n`` prompts (``RunningBatch.join``: encoders, fusion,
  decoder over the prompts), as ``mmfuse-serve`` runs them; 64 is an evaluation batch;
- ``step_8``: one decoding step of 8 rows (small products: both sides run ``F.linear``);

and the GFLOP/s of each side on the products of a prefill of 8 prompts (the decoder's).
Prints each time, the ratio ``F.linear`` / oneDNN and the largest difference between the two
sides' first-token logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.batcher_load import prompts
from benchmarks.common import alternate, median, trained_model_from_args
from mmfuse.generation import GenerationConfig, decoder_step
from mmfuse.model import MMFuseModel
from mmfuse.modules.onednn_linear import OneDNNLinear, use_onednn_linears
from mmfuse.processing.collate import Collator
from mmfuse.processing.processor import Processor
from mmfuse.running_batch import RunningBatch

SIDES = ("linear", "onednn")
PREFILLS = (1, 8, 16, 64)
FIGURES = {
    **{f"prefill_{n}": f"prefill of {n} prompt{'s' if n > 1 else ''}" for n in PREFILLS},
    "step_8": "decoding step of 8 rows",
}


def switched(model: MMFuseModel, side: str, call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with the model's linear layers set to ``side`` first."""

    def run() -> object:
        use_onednn_linears(model, enabled=side == "onednn")
        return call()

    return run


def product_rates(rows: int, widths: list[tuple[int, int]], repeats: int) -> dict[str, float]:
    """GFLOP/s of each side on (rows, in) @ (in, out) products with bias, summed over
    ``widths``."""
    layers = [OneDNNLinear(i, o) for i, o in widths]
    inputs = [torch.randn(rows, i) for i, _ in widths]
    flops = sum(2 * rows * i * o for i, o in widths)

    def side(onednn: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for layer, x in zip(layers, inputs, strict=True):
                    layer(x) if onednn else F.linear(x, layer.weight, layer.bias)

        return run

    times = alternate({"linear": side(False), "onednn": side(True)}, 10, repeats * 20)
    return {name: flops / median(t) / 1e9 for name, t in times.items()}


def measure(
    model: MMFuseModel, processor: Processor, world: str | Path, repeats: int
) -> dict[str, float]:
    """{figure_side: ms or GFLOP/s} and the largest logit difference, on ``model`` (eval
    mode; left with its linear layers on oneDNN)."""
    collator = Collator(processor.tokenizer.pad_token_id, "left", processor.image.size)
    samples = prompts(processor, Path(world), max(PREFILLS))
    config = GenerationConfig(max_new_tokens=8)
    result: dict[str, float] = {}

    def prefill(count: int) -> Callable[[], RunningBatch]:
        batch = collator(samples[:count])

        def run() -> RunningBatch:
            running = RunningBatch(model)
            running.join(batch, [config] * count)
            return running

        return run

    for count in PREFILLS:
        fns = {side: switched(model, side, prefill(count)) for side in SIDES}
        for side, values in alternate(fns, 2, repeats).items():
            result[f"prefill_{count}_{side}_ms"] = median(values) * 1000
    running = prefill(8)()
    step = {side: switched(model, side, running.step) for side in SIDES}
    for side, values in alternate(step, 3, repeats).items():  # the rows grow a token a call
        result[f"step_8_{side}_ms"] = median(values) * 1000

    batch = collator(samples[:8])

    @torch.inference_mode()
    def first_logits() -> tuple[torch.Tensor, int]:
        """The first-token logits (8, V) and the decoder's prompt positions (8 x length)."""
        inputs = model.prepare_inputs(batch)
        embeds, mask, positions = inputs.embeds, inputs.attention_mask, inputs.position_ids
        logits, _ = decoder_step(model.decoder, embeds, mask, positions, None)
        return logits, embeds.shape[0] * embeds.shape[1]

    (plain, rows), (fast, _) = (switched(model, side, first_logits)() for side in SIDES)
    result["max_logit_diff"] = (plain - fast).abs().max().item()

    decoder = model.decoder.config
    hidden, inner = decoder.hidden_size, decoder.intermediate_size
    widths = [(hidden, hidden)] * 4 + [(hidden, inner)] * 2 + [(inner, hidden)]
    for side, rate in product_rates(rows, widths, repeats).items():
        result[f"decoder_products_{side}_gflops"] = rate
    result["decoder_product_rows"] = rows
    use_onednn_linears(model)
    return result


def main() -> None:
    args, model, processor = trained_model_from_args(__doc__.splitlines()[0])
    result = measure(model, processor, args.world, args.repeats)
    print(f"{args.ckpt}, {args.threads} thread(s), median of {args.repeats} rounds")
    for figure in FIGURES:
        plain, fast = result[f"{figure}_linear_ms"], result[f"{figure}_onednn_ms"]
        print(f"{figure:11s} F.linear {plain:7.2f} ms  oneDNN {fast:7.2f} ms  x{plain / fast:.2f}")
    plain, fast = result["decoder_products_linear_gflops"], result["decoder_products_onednn_gflops"]
    print(
        f"decoder products of a prefill of 8 ({result['decoder_product_rows']} rows): "
        f"F.linear {plain:.0f} GFLOP/s, oneDNN {fast:.0f} GFLOP/s, x{fast / plain:.2f}"
    )
    print(f"first-token logits, max abs difference: {result['max_logit_diff']:.2g}")


if __name__ == "__main__":
    main()
