"""``make bench``: every benchmark in one run; prints one table and writes
``runs/bench/results.json`` (one key per figure) and ``runs/bench/scaling.png``.

    .venv/bin/python -m benchmarks.run [--repeats 3] [--threads N] [--compile] [--only a,b]

Sections (``--only`` / ``--skip`` take their names): overhead, generation, feature_cache,
data, compute, memory, scaling, optim, allocator, audio_frontend, onednn_linear,
shared_prefill, row_groups, sample_cache, compile (only with ``--compile``: torch.compile
takes minutes to build on 2 cores). Figures are ratios measured side by side in this run:
medians over repeats after warm-up. See benchmarks/README.md for what each one measures.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import (
    allocator,
    audio_frontend,
    compute,
    data_pipeline,
    feature_cache,
    generation,
    memory,
    onednn_linear,
    optimisations,
    overhead,
    row_groups,
    sample_cache,
    shared_prefill,
)
from benchmarks.common import (
    BENCH_DIR,
    Report,
    build_model,
    compose_train,
    matmul_flops_per_second,
    median,
    train_batches,
)
from benchmarks.scaling import measure_scaling, plot
from mmfuse.allocator import keep_freed_memory

WORLD = "data/world"
SECTIONS = (
    "overhead",
    "generation",
    "feature_cache",
    "data",
    "compute",
    "memory",
    "scaling",
    "optim",
    "allocator",
    "audio_frontend",
    "onednn_linear",
    "shared_prefill",
    "row_groups",
    "sample_cache",
    "compile",
)


class Bench:
    """Runs the sections in order; later ones reuse earlier measurements (the small preset's
    Lightning step time feeds the compute efficiency)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.report = Report()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = self.out / "lightning.log"
        self.log_file.write_text("")
        self.overrides = list(args.overrides)
        self.cfg = compose_train(self.overrides, self.out / "work")
        self.processor, self.model = build_model(self.cfg)
        self.repeats = args.repeats
        steps = args.steps or int(self.cfg.trainer.log_every_n_steps)
        self.warmup, self.steps = args.warmup, steps
        self.batches = train_batches(self.cfg, self.processor, self.warmup + self.steps)
        self.lightning_step_s: float | None = None
        self.demo_kernels: dict[str, str] = {}

    # -------------------------------------------------------------------- 1. overhead
    def overhead(self) -> None:
        r = self.report
        result = overhead.measure_overhead(
            self.cfg, self.model, self.batches, self.warmup, self.repeats, self.log_file
        )
        self.lightning_step_s = result.lightning_s
        r.add("overhead.lightning_step_s", "Lightning training step (s)", result.lightning_s)
        r.add("overhead.plain_step_s", "hand-written PyTorch step (s)", result.plain_s)
        r.add(
            "overhead.ratio",
            "framework overhead: Lightning / plain",
            result.ratio,
            "{:.3f}",
            "<= 1.10",
            result.ratio <= 1.10,
        )
        r.add(
            "overhead.max_abs_loss_diff",
            "  losses, max abs difference",
            result.max_abs_loss_diff,
            "{:.2g}",
            "== 0",
            result.max_abs_loss_diff == 0.0,
            f"{self.steps + self.warmup} steps x {self.repeats} repeats",
        )
        r.extra["overhead.ratios"] = result.ratios
        r.extra["overhead.lightning_times"] = result.lightning_times
        r.extra["overhead.plain_times"] = result.plain_times
        per_step, calls, in_optim = overhead.count_host_syncs(
            self.cfg, self.model, self.batches[: min(len(self.batches), 6)]
        )
        r.add(
            "overhead.host_reads_per_step",
            "  host reads per Lightning step",
            per_step,
            "{:.1f}",
            note="item/bool/float/int/tolist; places in results.json",
        )
        r.extra["overhead.host_reads"] = dict(calls.most_common())
        r.extra["overhead.host_reads_torch_optim"] = in_optim

    # -------------------------------------------------------------------- 2. generation
    def generation(self) -> None:
        r = self.report
        prompts = Path(self.args.world) / "test.jsonl"
        batch = generation.prompt_batch(self.processor, prompts, self.args.gen_rows)
        result = generation.measure_generation(
            self.model,
            batch,
            self.args.new_tokens,
            warmup=1,
            repeats=self.repeats,
            uncached_repeats=max(1, min(2, self.repeats)),
        )
        note = f"{self.args.gen_rows} rows x {result.tokens_per_row} new tokens, greedy"
        r.add("generation.cached_s", "generate with KV cache (s)", result.cached_s, note=note)
        r.add("generation.uncached_s", "generate without cache (s)", result.uncached_s)
        r.add("generation.hf_s", "transformers generate (s)", result.hf_s)
        r.add(
            "generation.cache_speedup",
            "KV cache speed-up: uncached / cached",
            result.cache_speedup,
            "{:.2f}",
            ">= 3",
            result.cache_speedup >= 3,
        )
        r.add(
            "generation.mmfuse_over_hf",
            "mmfuse / transformers generate",
            result.mmfuse_over_hf,
            "{:.3f}",
            "<= 1.10",
            result.mmfuse_over_hf <= 1.10,
        )
        r.add(
            "generation.token_agreement",
            "  tokens agreeing (cached/uncached/HF)",
            result.agreement,
            "{:.3f}",
            note="share before rows first differ (near-ties of a random model)",
        )

    # -------------------------------------------------------------------- 3. feature cache
    def feature_cache(self) -> None:
        add_feature_cache(self.report, self.args)

    # -------------------------------------------------------------------- 4. data
    def data(self) -> None:
        r = self.report
        cfg = compose_train(["experiment=demo", *self.args.data_overrides], self.out / "work-demo")
        processor, model = build_model(cfg)
        self.demo_kernels = optimisations.attention_kernels(model)
        loader = data_pipeline.loader_throughput(
            cfg, processor, batches=self.args.loader_batches, repeats=self.repeats
        )
        batches = train_batches(cfg, processor, self.warmup + 10)
        times = []
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for _ in range(max(1, min(2, self.repeats))):
            model.load_state_dict(state)
            run = overhead.run_lightning(cfg, model, batches, self.log_file)
            times.append(run.step_time(self.warmup))
        step_s = median(times)
        consumed = loader.batch_size / step_s
        ratio = loader.samples_per_s / consumed
        note = f"demo data config: batch {loader.batch_size}, {loader.num_workers} worker(s)"
        r.add(
            "data.loader_samples_per_s",
            "loader alone (samples/s)",
            loader.samples_per_s,
            "{:.0f}",
            note=note,
        )
        r.add(
            "data.train_samples_per_s",
            "training consumes (samples/s)",
            consumed,
            "{:.0f}",
            note="demo model, Lightning step",
        )
        r.add("data.loader_over_training", "loader / training", ratio, "{:.2f}", ">= 5", ratio >= 5)
        r.add("data.first_batch_s", "  first batch (worker start) (s)", loader.first_batch_s)

    # -------------------------------------------------------------------- 5. compute
    def compute(self) -> None:
        r = self.report
        timed = self.batches[self.warmup :][: max(1, self.args.flop_batches)]
        counts = [compute.training_step_flops(self.model, b) for b in timed]
        flops = sum(c[0] for c in counts) / len(counts)
        parts: dict[str, float] = {}
        for _, per_part in counts:
            for name, value in per_part.items():
                parts[name] = parts.get(name, 0.0) + value / len(counts)
        peak = matmul_flops_per_second(self.args.matmul_size)
        step_s = self.lightning_step_s
        if step_s is None:  # overhead skipped: time the plain loop here
            run = overhead.run_plain(self.cfg, self.model, self.batches)
            step_s = run.step_time(self.warmup)
        achieved = flops / step_s
        r.add(
            "compute.step_gflop",
            "training step FLOPs (GFLOP, counted)",
            flops / 1e9,
            "{:.2f}",
            note="FlopCounterMode: forward + backward",
        )
        r.add("compute.train_gflops", "training GFLOP/s", achieved / 1e9, "{:.1f}")
        r.add(
            "compute.matmul_gflops",
            "fp32 matmul GFLOP/s (torch.mm)",
            peak / 1e9,
            "{:.1f}",
            note=f"{self.args.matmul_size}^2, {torch.get_num_threads()} threads",
        )
        r.add(
            "compute.efficiency", "compute efficiency: training / matmul", achieved / peak, "{:.1%}"
        )
        r.extra["compute.forward_gflop_by_component"] = {k: v / 1e9 for k, v in parts.items()}

    # -------------------------------------------------------------------- 6. memory
    def memory(self) -> None:
        r = self.report
        threads = self.args.threads
        path = memory.save_batches(self.batches[self.warmup :][:2], self.out / "memory_batches.pt")
        plain = memory.measure_memory(self.overrides, False, path, threads=threads)
        ckpt = memory.measure_memory(self.overrides, True, path, threads=threads)
        diff = max(abs(a - b) for a, b in zip(plain.losses, ckpt.losses, strict=True))
        r.add(
            "memory.peak_mb",
            "peak RSS, training step (MB)",
            plain.peak_mb,
            "{:.0f}",
            note="child process VmHWM, batch of the overhead runs",
        )
        r.add(
            "memory.peak_mb_checkpointing",
            "peak RSS, gradient checkpointing (MB)",
            ckpt.peak_mb,
            "{:.0f}",
        )
        r.add("memory.step_mb", "  step's growth over baseline (MB)", plain.step_mb, "{:.0f}")
        r.add(
            "memory.step_mb_checkpointing",
            "  same, gradient checkpointing (MB)",
            ckpt.step_mb,
            "{:.0f}",
        )
        ratio = ckpt.step_mb / plain.step_mb if plain.step_mb > 0 else math.nan
        slower, time_diff = optimisations.checkpointing_effect(
            self.cfg, self.model, self.batches[: self.warmup + 8], self.warmup
        )
        r.add(
            "memory.checkpointing_step_ratio",
            "checkpointing / plain (step growth)",
            ratio,
            "{:.2f}",
            note=f"losses max abs diff {diff:.2g}",
        )
        r.add(
            "memory.checkpointing_time_ratio",
            "checkpointing / plain (step time)",
            slower,
            "{:.2f}",
            note=f"plain loop, interleaved; losses max abs diff {time_diff:.2g}",
        )

    # -------------------------------------------------------------------- 7. scaling
    def scaling(self) -> None:
        r = self.report
        args = self.args
        result = measure_scaling(
            self.model,
            image_size=self.processor.image.size,
            sample_rate=self.processor.audio.sample_rate,
            batch_size=args.scaling_batch,
            text_lengths=args.text_lengths,
            audio_seconds=args.audio_seconds,
            fixed_text=64,
            fixed_audio_s=1.0,
            warmup=1,
            repeats=self.repeats,
        )
        png = plot(result, self.out / "scaling.png")
        text_x = result.text_step_s[-1] / result.text_step_s[0]
        media_x = result.media_step_s[-1] / result.media_step_s[0]
        r.add(
            "scaling.text_ratio",
            f"step time x{text_x:.2f} for text x{result.text_tokens[-1] // result.text_tokens[0]}",
            text_x,
            "{:.2f}",
            note=f"{result.text_tokens[0]} -> {result.text_tokens[-1]} tokens",
        )
        r.add(
            "scaling.media_ratio",
            f"step time x{media_x:.2f} for media tokens "
            f"x{result.media_tokens[-1] / result.media_tokens[0]:.1f}",
            media_x,
            "{:.2f}",
            note=f"{result.media_tokens[0]} -> {result.media_tokens[-1]} tokens",
        )
        r.add(
            "scaling.plot",
            "scaling plot",
            str(png) if png else "matplotlib not installed: pip install matplotlib",
        )
        r.extra["scaling"] = vars(result)

    # -------------------------------------------------------------------- optimisations
    def optim(self) -> None:
        r = self.report
        batch = self.batches[self.warmup]
        kernels = optimisations.attention_kernels(self.model)
        kernels.update({f"demo:{k}": v for k, v in self.demo_kernels.items()})
        not_sdpa = {k: v for k, v in kernels.items() if v != "sdpa"}
        r.add(
            "optim.attention_sdpa",
            "attention modules on SDPA",
            f"{len(kernels) - len(not_sdpa)}/{len(kernels)}",
            target="all",
            holds=not not_sdpa and bool(kernels),
            note=", ".join(f"{k}: {v}" for k, v in not_sdpa.items()),
        )
        r.extra["optim.attention_kernels"] = kernels
        steps = optimisations.optimizer_step_times(
            self.cfg, self.model, batch, 3, max(5, 3 * self.repeats)
        )
        configured = optimisations.configured_adamw(self.cfg)
        step_s = self.lightning_step_s
        for name, seconds in steps.items():
            note = ["configured"] if name == configured else []
            if step_s:
                note.append(f"{seconds / step_s:.1%} of a Lightning step")
            r.add(
                f"optim.adamw_{name.replace('-', '_')}_ms",
                f"AdamW step, {name} (ms)",
                seconds * 1e3,
                "{:.1f}",
                note=", ".join(note),
            )
        r.add(
            "optim.adamw_fused_over_configured",
            f"AdamW fused / {configured}",
            steps["fused"] / steps[configured],
            "{:.2f}",
        )
        ratio, diff, _ = optimisations.fused_adamw_effect(
            self.cfg, self.model, self.batches[: self.warmup + 12], self.warmup
        )
        r.add(
            "optim.fused_step_ratio",
            f"training step, fused / {configured} AdamW",
            ratio,
            "{:.3f}",
            note=f"plain loop, interleaved; first {self.warmup} losses max abs diff {diff:.2g}",
        )
        r.extra["optim.fused_loss_diff"] = diff
        norms = optimisations.grad_norm_times(
            self.cfg, self.model, batch, 3, max(5, 3 * self.repeats)
        )
        both = norms["guard_norm"] + norms["clip"]
        share = f"{both / step_s:.1%} of a step" if step_s else ""
        r.add(
            "optim.grad_norm_passes_ms",
            "gradient-norm passes per step (ms)",
            both * 1e3,
            "{:.1f}",
            note=f"guard {norms['guard_norm'] * 1e3:.1f} + clip {norms['clip'] * 1e3:.1f}; {share}",
        )

    # -------------------------------------------------------------------- allocator
    def allocator(self) -> None:
        r = self.report
        results = allocator.run(self.args.world, self.repeats * 5, torch.get_num_threads())
        r.extra["allocator"] = results
        for name, label in allocator.FIGURES.items():
            default, kept = results["default"][name], results["kept"][name]
            r.add(f"allocator.{name}_ratio", f"freed memory kept, {label.split(' (')[0]}",
                  default / kept, "{:.2f}", note=f"default {default:.1f} ms / kept {kept:.1f} ms;"
                  " demo model, child processes")  # fmt: skip

    # -------------------------------------------------------------------- audio front end
    def audio_frontend(self) -> None:
        r = self.report
        result = audio_frontend.measure(clips=16, repeats=self.repeats * 5)
        r.extra["audio_frontend"] = result
        for name, label in audio_frontend.FIGURES.items():
            ref = result[f"{name}_transformers_ms"]
            fast = result[f"{name}_channels_last_ms"]
            r.add(f"audio_frontend.{name}_ratio", f"wav2vec2 front end, {label}: transformers"
                  " / channels-last", ref / fast, "{:.2f}", note=f"{ref:.1f} / {fast:.1f} ms;"
                  " demo model, 16 clips")  # fmt: skip
        diff = result["max_abs_diff"]
        r.add("audio_frontend.max_abs_diff", "  outputs, max abs difference", diff, "{:.2g}",
              "< 1e-4", diff < 1e-4)  # fmt: skip

    def _demo_model(self, work: str):
        """The demo config's processor and model (seed 0, random weights, eval mode), built
        with ``work`` under the output directory as its run directory."""
        processor, model = build_model(compose_train(["experiment=demo"], self.out / work), seed=0)
        return processor, model.eval()

    # -------------------------------------------------------------------- oneDNN linear
    def onednn_linear(self) -> None:
        r = self.report
        processor, model = self._demo_model("work-onednn-linear")
        result = onednn_linear.measure(model, processor, self.args.world, self.repeats * 5)
        r.extra["onednn_linear"] = result
        for name, label in onednn_linear.FIGURES.items():
            plain, fast = result[f"{name}_linear_ms"], result[f"{name}_onednn_ms"]
            large = name in ("prefill_16", "prefill_64")  # the products oneDNN is for
            target, ok = ("> 1", plain > fast) if large else ("", None)
            r.add(f"onednn_linear.{name}_ratio", f"{label}: F.linear / oneDNN linears",
                  plain / fast, "{:.2f}", target, ok,
                  note=f"{plain:.1f} / {fast:.1f} ms; demo model")  # fmt: skip
        diff = result["max_logit_diff"]
        r.add("onednn_linear.max_logit_diff", "  first-token logits, max abs difference", diff,
              "{:.2g}", "< 1e-4", diff < 1e-4)  # fmt: skip

    # -------------------------------------------------------------------- shared prefill
    def shared_prefill(self) -> None:
        r = self.report
        processor, model = self._demo_model("work-shared-prefill")
        result = shared_prefill.measure(model, processor, self.args.world, self.repeats * 5)
        r.extra["shared_prefill"] = result
        for n in shared_prefill.CHOICES:
            shared, repeated = result[f"shared_{n}_ms"], result[f"repeated_{n}_ms"]
            same = bool(result[f"same_first_tokens_{n}"])
            r.add(f"shared_prefill.n{n}_ratio", f"n={n} choices: {n} prefills / one copied",
                  repeated / shared, "{:.2f}", "> 1, same first tokens",
                  repeated > shared and same, note=f"{repeated:.1f} / {shared:.1f} ms;"
                  " demo model, an image+audio prompt")  # fmt: skip

    # -------------------------------------------------------------------- row groups
    def row_groups(self) -> None:
        r = self.report
        result = row_groups.measure(batches=8, repeats=self.repeats * 2)
        r.extra["row_groups"] = result
        one, grouped = result["one_ms"], result["grouped_ms"]
        r.add("row_groups.step_ratio", f"training step, one padded batch / {result['row_groups']}"
              " row groups", one / grouped, "{:.2f}", "> 1", one > grouped,
              note=f"{one:.1f} / {grouped:.1f} ms; demo model, 8 batches")  # fmt: skip
        r.add("row_groups.positions_share", "  decoder positions run, share of padded",
              result["positions_share"], "{:.2f}")  # fmt: skip
        diff = result["max_loss_diff"]
        r.add("row_groups.max_loss_diff", "  losses, max abs difference", diff, "{:.2g}",
              "< 1e-5", diff < 1e-5)  # fmt: skip

    # -------------------------------------------------------------------- sample cache
    def sample_cache(self) -> None:
        r = self.report
        result = sample_cache.measure(records=640, repeats=self.repeats)
        r.extra["sample_cache"] = result
        plain, cached = result["plain_steps_per_s"], result["cached_steps_per_s"]
        r.add("sample_cache.step_ratio", "training epoch, steps/s from the sample cache / without",
              cached / plain, "{:.2f}", "> 1", cached > plain,
              note=f"{plain:.2f} / {cached:.2f} steps/s; demo, 640 records")  # fmt: skip
        load, kept = result["plain_load_ms"], result["cached_load_ms"]
        r.add("sample_cache.load_ratio", "  loading a batch, without / from the cache",
              load / kept, "{:.1f}", note=f"{load:.1f} / {kept:.1f} ms")  # fmt: skip

    # -------------------------------------------------------------------- compile
    def compile(self) -> None:
        r = self.report
        count = self.args.compile_steps
        if count <= 3:
            raise ValueError("--compile-steps must exceed the 3 steps compilation settles in")
        batches = self.batches[:count]
        if len(batches) < count:
            batches = train_batches(self.cfg, self.processor, count)
        cold = not self.args.compile_warm
        torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break warnings: see README
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        result = optimisations.compile_break_even(self.cfg, self.model, batches, cold=cold)
        r.extra["compile.eager_durations"] = result.eager_durations
        r.extra["compile.compiled_durations"] = result.compiled_durations
        r.add("compile.eager_step_s", "eager step, plain loop (s)", result.eager_step_s)
        r.add("compile.compiled_step_s", "torch.compile step (s)", result.compiled_step_s)
        r.add(
            "compile.speedup",
            "torch.compile speed-up: eager / compiled",
            result.eager_step_s / result.compiled_step_s,
            "{:.2f}",
        )
        r.add(
            "compile.overhead_s",
            "  compilation (s)",
            result.compile_overhead_s,
            "{:.0f}",
            note=f"{result.steps} real batches, recompiles included, "
            + ("empty inductor cache" if cold else "inductor cache on disk"),
        )
        r.add(
            "compile.break_even_steps",
            "  break-even (steps)",
            result.break_even_steps,
            "{:.0f}",
            note="never" if math.isinf(result.break_even_steps) else "",
        )


CACHE_TARGET = 3.0
"""Issue target: with a frozen ViT-S-sized image encoder and wav2vec2, a cached step is at
least this many times faster than one recomputing the encoders."""


def add_feature_cache(report: Report, args: argparse.Namespace) -> None:
    """Adds the figures of ``benchmarks/feature_cache.run``: cached against recomputed frozen
    encoders on the small preset and with ViT-S-sized encoders, and the padding efficiency
    of random and length-grouped batches."""
    figures = feature_cache.run(repeats=args.repeats, small_only=args.feature_cache_small_only)
    labels = {"small": "small preset", "vit_s": "ViT-S-sized encoders"}
    for name, label in labels.items():
        if f"{name}.step_speedup" not in figures:
            continue
        step = figures[f"{name}.step_speedup"]
        target = name == "vit_s"
        report.add(f"feature_cache.{name}.step_speedup", f"feature cache, {label}: step",
                   step, "{:.2f}", f">= {CACHE_TARGET:g}" if target else "",
                   step >= CACHE_TARGET if target else None,
                   note=f"recomputed / cached; frozen encoders "
                   f"{figures[f'{name}.encoder_share']:.0%} of a step")  # fmt: skip
        report.add(f"feature_cache.{name}.load_speedup", "  same, step with data loading",
                   figures[f"{name}.load_speedup"], "{:.2f}")  # fmt: skip
        diff = figures[f"{name}.loss_diff"]
        report.add(f"feature_cache.{name}.loss_diff", "  losses at step 0, abs difference",
                   diff, "{:.2g}", "< 1e-5", diff < 1e-5)  # fmt: skip
    report.add("feature_cache.padding_random", "padding efficiency, random batches",
               figures["padding.random"], "{:.3f}")  # fmt: skip
    report.add("feature_cache.padding_length_grouped", "padding efficiency, length-grouped",
               figures["padding.length_grouped"], "{:.3f}", "> random",
               figures["padding.length_grouped"] > figures["padding.random"])  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(BENCH_DIR))
    p.add_argument("--world", default=WORLD, help="the built-in world (generation prompts)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of every figure")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps per run")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed training steps per run (default: trainer.log_every_n_steps)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--only", default="", help="comma-separated sections to run")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--compile-steps", type=int, default=12)
    p.add_argument("--compile-warm", action="store_true", help="reuse the inductor cache on disk")
    p.add_argument(
        "--feature-cache-small-only",
        action="store_true",
        help="feature cache on the small preset only (not the ViT-S-sized encoders)",
    )
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-rows", type=int, default=4)
    p.add_argument("--loader-batches", type=int, default=8)
    p.add_argument("--flop-batches", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--scaling-batch", type=int, default=8)
    p.add_argument("--text-lengths", type=_ints, default=[32, 64, 128, 256], help="e.g. 32,64")
    p.add_argument("--audio-seconds", type=_floats, default=[0.5, 1, 2, 4, 8], help="e.g. 1,2")
    p.add_argument(
        "--data-overrides",
        type=lambda text: [x for x in text.split(",") if x],
        default=[],
        help="overrides of the data section's config (experiment=demo), comma-separated",
    )
    p.add_argument("overrides", nargs="*", help="training config overrides (default: small)")
    return p.parse_args(argv)


def _run_section(bench: Bench, name: str) -> None:
    began = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    try:
        getattr(bench, name)()
    except Exception as err:  # one failing section must not hide the others' figures
        message = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        bench.report.add(f"{name}.error", f"{name}: failed", "error", note=message)
        print(f"[bench] {name} failed: {err!r}", file=sys.stderr, flush=True)
    print(f"[bench] {name} done in {time.perf_counter() - began:.0f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    keep_freed_memory()  # as every mmfuse command does (mmfuse/allocator.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.world) / "world.json").is_file():
        sys.exit(f"{args.world} holds no world: python -m data_modules.world --out {args.world}")
    only = [s for s in args.only.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    unknown = (set(only) | skip) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    sections = [s for s in (only or SECTIONS) if s not in skip]
    if "compile" in sections and not (args.compile or "compile" in only):
        sections.remove("compile")
    start = time.perf_counter()
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"[bench] load average {load:.1f} before starting: other work shares the cores, "
              "timings are noisy (the ratios less so: each is measured side by side)")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the table is the output
        bench = Bench(args)
        for name in sections:
            _run_section(bench, name)
    report = bench.report
    report.extra["meta"] = {
        "seconds": time.perf_counter() - start,
        "load_average_before": load,
        "load_average_after": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "overrides": args.overrides,
        "sections": sections,
    }
    path = report.write(Path(args.out) / "results.json")
    print()
    print(report.table())
    print(f"\n{path} ({time.perf_counter() - start:.0f} s, {torch.get_num_threads()} threads)")
    return report


if __name__ == "__main__":
    main()
