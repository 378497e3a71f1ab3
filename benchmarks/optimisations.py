"""Checks and measurements behind the optimisations: attention kernels, the optimiser's
implementation, the gradient-norm passes, and ``torch.compile``'s break-even point."""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, open_dict
from torch import nn
from transformers import PreTrainedModel

from benchmarks.common import alternate, clone_state, make_optimizer, median, optimizer_params
from benchmarks.overhead import PlainLoop, run_plain
from mmfuse.loss import next_token_loss
from mmfuse.model import MMFuseModel
from mmfuse.modules.attention import Attention
from mmfuse.scale import enable_gradient_checkpointing
from mmfuse.types import Batch

# ----------------------------------------------------------------------------- attention


def attention_kernels(model: nn.Module) -> dict[str, str]:
    """How every attention of the model is computed, by module name: ``sdpa`` where it calls
    ``torch.nn.functional.scaled_dot_product_attention``, otherwise what it uses."""
    found: dict[str, str] = {}
    hf_roots = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(
            name.startswith(root + ".") for root in hf_roots
        ):
            hf_roots.append(name)
            found[name] = str(getattr(module.config, "_attn_implementation", "?"))
        elif isinstance(module, Attention):
            found[name] = "sdpa"  # mmfuse's one attention implementation
        elif hasattr(module, "fused_attn") and hasattr(module, "qkv"):  # timm
            found[name] = "sdpa" if module.fused_attn else "eager (timm fused_attn=False)"
        elif isinstance(module, nn.MultiheadAttention):
            found[name] = "nn.MultiheadAttention"
    return found


# ----------------------------------------------------------------------------- optimiser

OPTIMIZER_VARIANTS = {
    "for-loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"foreach": False, "fused": True},
}


def configured_adamw(cfg: DictConfig) -> str:
    """The configured AdamW implementation (on CPU tensors ``foreach=None`` is the loop)."""
    if cfg.optimizer.get("fused"):
        return "fused"
    return "foreach" if cfg.optimizer.get("foreach") else "for-loop"


def optimizer_step_times(
    cfg: DictConfig, model: MMFuseModel, batch: Batch, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds of ``optimizer.step()`` for each AdamW implementation (the configured
    groups and settings), on the gradients of one real batch; weights restored after."""
    state = clone_state(model)
    model.train()
    logits, labels = model(batch)
    next_token_loss(logits, labels, batch.ids)[0].backward()
    optimizers = {
        name: make_optimizer(model, cfg, total_steps=1, **kwargs)[0]
        for name, kwargs in OPTIMIZER_VARIANTS.items()
    }
    times = alternate({n: o.step for n, o in optimizers.items()}, warmup, repeats)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return {name: median(t) for name, t in times.items()}


def optimizer_losses_agree(
    cfg: DictConfig, model: MMFuseModel, batches: list[Batch], variant: str
) -> float:
    """Largest absolute loss difference between the configured optimiser and ``variant``
    over a plain-loop run on ``batches``."""
    state = clone_state(model)
    base = run_plain(cfg, model, batches).losses
    model.load_state_dict(state)
    kwargs = OPTIMIZER_VARIANTS[variant]
    other = run_plain(_with_optimizer(cfg, kwargs), model, batches).losses
    model.load_state_dict(state)
    return max(abs(a - b) for a, b in zip(base, other, strict=True))


def _with_optimizer(cfg: DictConfig, kwargs: dict) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in kwargs.items():
            cfg.optimizer[key] = value
    return cfg


def interleaved_plain_steps(
    cfgs: dict[str, DictConfig],
    model: MMFuseModel,
    batches: list[Batch],
    seed: int = 0,
    prepare: dict[str, Callable[[MMFuseModel], object]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Trains one copy of ``model`` per config with the plain loop, step by step in turn on
    the same batches (the order reversed every other batch; each copy with its own RNG
    stream, seeded alike): every step's seconds and loss per config. ``prepare[name]`` is
    applied to that config's copy first (e.g. switching on gradient checkpointing)."""
    loops = {}
    for name, cfg in cfgs.items():
        twin = copy.deepcopy(model, memo={id(model.tokenizer): model.tokenizer})
        if prepare and name in prepare:
            prepare[name](twin)
        loops[name] = PlainLoop(cfg, twin, len(batches))
    torch.manual_seed(seed)
    rng = {name: torch.get_rng_state() for name in loops}
    times: dict[str, list[float]] = {name: [] for name in loops}
    losses: dict[str, list[float]] = {name: [] for name in loops}
    saved = torch.get_rng_state()
    for i, batch in enumerate(batches):
        for name in list(loops) if i % 2 == 0 else list(reversed(loops)):
            torch.set_rng_state(rng[name])
            start = time.perf_counter()
            loss = loops[name].step(batch)
            times[name].append(time.perf_counter() - start)
            losses[name].append(float(loss))
            rng[name] = torch.get_rng_state()
    torch.set_rng_state(saved)
    return times, losses


def fused_adamw_effect(
    cfg: DictConfig, model: MMFuseModel, batches: list[Batch], warmup: int
) -> tuple[float, float, str]:
    """Plain-loop step time with fused AdamW over the configured AdamW, interleaved step by
    step (the sums over the steps after ``warmup``); the largest loss difference over the
    first ``warmup`` steps (fused AdamW rounds differently: about 1e-7 relative per step,
    which early training at a high learning rate amplifies later on); the configured
    implementation's name."""
    configured = configured_adamw(cfg)
    cfgs = {"configured": cfg, "fused": _with_optimizer(cfg, OPTIMIZER_VARIANTS["fused"])}
    times, losses = interleaved_plain_steps(cfgs, model, batches, int(cfg.seed))
    ratio = sum(times["fused"][warmup:]) / sum(times["configured"][warmup:])
    early = zip(losses["fused"][:warmup], losses["configured"][:warmup], strict=True)
    diff = max(abs(a - b) for a, b in early)
    return ratio, diff, configured


def checkpointing_effect(
    cfg: DictConfig, model: MMFuseModel, batches: list[Batch], warmup: int
) -> tuple[float, float]:
    """Plain-loop step time with gradient checkpointing (decoder and encoders) over without,
    interleaved step by step (sums over the steps after ``warmup``), and the largest loss
    difference (recomputation gives the same values)."""
    cfgs = {"plain": cfg, "checkpointing": cfg}
    switch = {"checkpointing": lambda m: enable_gradient_checkpointing(m, True, True)}
    times, losses = interleaved_plain_steps(cfgs, model, batches, int(cfg.seed), switch)
    ratio = sum(times["checkpointing"][warmup:]) / sum(times["plain"][warmup:])
    pairs = zip(losses["checkpointing"], losses["plain"], strict=True)
    return ratio, max(abs(a - b) for a, b in pairs)


def grad_norm_times(
    cfg: DictConfig, model: MMFuseModel, batch: Batch, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds of the two gradient-norm passes of a Lightning step: the non-finite
    guard's ``get_total_norm`` (logged as train/grad_norm) and ``clip_grad_norm_``."""
    state = clone_state(model)
    model.train()
    logits, labels = model(batch)
    next_token_loss(logits, labels, batch.ids)[0].backward()
    optimizer, _ = make_optimizer(model, cfg, total_steps=1)
    params = optimizer_params(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    clip = float(cfg.trainer.get("gradient_clip_val") or 1.0)
    times = alternate(
        {
            "guard_norm": lambda: float(torch.nn.utils.get_total_norm(grads, foreach=True)),
            # a huge max_norm: measure the pass without changing the gradients
            "clip": lambda: torch.nn.utils.clip_grad_norm_(params, clip * 1e30),
        },
        warmup,
        repeats,
    )
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return {name: median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- compile


@dataclass
class CompileResult:
    eager_step_s: float
    compiled_step_s: float
    compile_overhead_s: float  # extra seconds of the compiled run's first steps
    break_even_steps: float  # inf when the compiled step is not faster
    steps: int
    eager_durations: list[float]
    compiled_durations: list[float]
    cold: bool


@contextlib.contextmanager
def _inductor_cache(cold: bool) -> Iterator[None]:
    """A fresh, empty inductor cache directory when ``cold`` (what a first run pays),
    otherwise the one on disk (what a repeated run pays)."""
    if not cold:
        yield
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="mmfuse-inductor-") as fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def compile_break_even(
    cfg: DictConfig, model: MMFuseModel, batches: list[Batch], settle: int = 3, cold: bool = True
) -> CompileResult:
    """``torch.compile(model)`` against eager in the plain loop on the same ``batches``
    (real ones, whose lengths differ: recompilations count). The steady step is the median
    of the steps after the first ``settle``; the overhead is the compiled run's total minus
    its steps at the steady time; break-even = overhead / (eager - compiled) steps. ``cold``:
    compile into an empty cache (a first run), else reuse the inductor cache on disk."""
    import torch._dynamo

    state = clone_state(model)
    eager = run_plain(cfg, model, batches)
    model.load_state_dict(state)
    torch._dynamo.reset()
    with _inductor_cache(cold):
        compiled = run_plain(cfg, model, batches, compiled=torch.compile(model))
    model.load_state_dict(state)
    torch._dynamo.reset()
    eager_steps, compiled_steps = eager.durations(), compiled.durations()
    eager_s, compiled_s = median(eager_steps[settle:]), median(compiled_steps[settle:])
    overhead = sum(compiled_steps) - compiled_s * len(compiled_steps)
    gain = eager_s - compiled_s
    return CompileResult(
        eager_s,
        compiled_s,
        overhead,
        overhead / gain if gain > 0 else float("inf"),
        len(batches),
        eager_steps,
        compiled_steps,
        cold,
    )
