"""The channels-last wav2vec2 front end (``mmfuse/modules/audio_frontend.py``) against
transformers' ``Wav2Vec2FeatureEncoder`` on the same layers.

Builds the demo model's audio encoder (``experiment=demo``, random weights, seed 0) and times,
side by side on ``--clips`` one-second clips, the medians over ``--repeats`` rounds of

- ``forward``: the front end alone under inference mode (what every prefill of
  ``mmfuse-serve`` and every evaluation batch runs);
- ``train``: forward and backward of the front end (a training step's share).

Prints each time and the ratio transformers / channels-last, and checks the outputs agree.

    .venv/bin/python -m benchmarks.audio_frontend [--clips 16] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

from benchmarks.common import BENCH_DIR, alternate, build_model, compose_train, median
from mmfuse.allocator import keep_freed_memory
from mmfuse.modules.audio_frontend import ChannelsLastFeatureEncoder

FIGURES = {"forward": "forward, inference mode", "train": "forward and backward"}


def reference_of(fast: ChannelsLastFeatureEncoder, config) -> Wav2Vec2FeatureEncoder:
    """transformers' feature encoder holding the very layers (parameters) of ``fast``."""
    reference = Wav2Vec2FeatureEncoder(config)
    reference.conv_layers = fast.conv_layers
    return reference


def measure(clips: int, repeats: int, overrides=("experiment=demo",)) -> dict[str, float]:
    """{figure_side: ms} for both sides of every figure, and the outputs' max difference."""
    cfg = compose_train(list(overrides), BENCH_DIR / "work-audio-frontend")
    _, model = build_model(cfg, seed=0)
    backbone = model.encoders["audio"].backbone
    fast = backbone.feature_extractor
    if not isinstance(fast, ChannelsLastFeatureEncoder):
        raise ValueError(f"the model's audio front end is {type(fast).__name__}")
    sides = {"transformers": reference_of(fast, backbone.config), "channels_last": fast}
    waves = torch.randn(clips, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        diff = (sides["transformers"](waves) - fast(waves)).abs().max().item()

    def forward(encoder):
        def call() -> None:
            with torch.inference_mode():
                encoder(waves)

        return call

    def train(encoder):
        def call() -> None:
            encoder(waves).square().mean().backward()

        return call

    result = {"max_abs_diff": diff}
    for figure, make in (("forward", forward), ("train", train)):
        times = alternate({side: make(enc) for side, enc in sides.items()}, 3, repeats)
        for side, values in times.items():
            result[f"{figure}_{side}_ms"] = median(values) * 1000
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    result = measure(args.clips, args.repeats)
    print(f"demo model's wav2vec2 front end, {args.clips} clips of 1 s, {args.threads} thread(s)")
    for figure, label in FIGURES.items():
        ref, fast = result[f"{figure}_transformers_ms"], result[f"{figure}_channels_last_ms"]
        print(f"{label}: transformers {ref:.2f} ms, channels-last {fast:.2f} ms, x{ref / fast:.2f}")
    print(f"outputs, max abs difference: {result['max_abs_diff']:.2g}")


if __name__ == "__main__":
    main()
