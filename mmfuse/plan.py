"""Compute planner: ``mmfuse-plan [training overrides] [flops_per_second=...]``.

From the training config alone (the model is built on the meta device: no memory is
allocated and no weights are read) it prints:

1. Parameters per component, total and trainable (after the ``freeze`` and ``lora``
   configs), counted on the built model: the numbers training reports.
2. Training FLOPs per sample. Each component processes ``t`` tokens per sample:
   text ``T = processor.max_length``; image tokens (patches + prefix tokens of the ViT at
   ``processor.image.size``); audio frames (the encoder's frame count for
   ``processor.audio.max_seconds``); prompt tokens ``processor.max_prompt_length``; memory
   ``M`` (the fusion's output length); the decoder reads ``L = M + T``. Per component:
   ``6 * N_mm * t`` (forward 2, backward 4 FLOPs per weight and token; ``N_mm`` = the weights
   of its Linear and convolution layers, so embedding look-ups are free and a tied output
   head is counted as the matmul it is; convolutions are counted once per output token,
   which undercounts strided convolutional stems) plus attention ``12 * n_layers * L^2 * d``
   (the ``Q K^T`` and ``A V`` products, ``2 L^2 d`` each forward, times 3 for training;
   Chinchilla appendix F without the softmax) for every transformer stack, and
   ``12 * n_layers * d * (M^2 + M * K)`` for query fusions over ``K`` media tokens. Every
   sample is assumed to carry an image and an audio clip and to fill ``T`` (an upper
   bound). A component with no trainable parameter and none upstream of it (a frozen
   encoder) needs no backward: ``2 * N_mm * t`` plus a third of its attention term.
3. Chinchilla compute-optimal training for the trainable decoder parameters ``N``:
   ``D = tokens_per_parameter * N`` tokens (about 20) and ``C = 6 * N * D``; and what ``D``
   text tokens cost with the whole model (``D / T`` samples at the per-sample FLOPs).
4. Memory per GPU under ddp, fsdp and DeepSpeed ZeRO-2/3 with ``num_gpus`` GPUs, bf16
   mixed precision and AdamW, for each card size (``gpu_memory_gb``). With ``P`` all
   parameters, ``P_t`` the trainable ones and ``G = num_gpus`` (bytes):

   - ddp (Lightning bf16-mixed keeps fp32 weights, autocasts the matmuls): ``4 P`` weights,
     ``4 P_t`` gradients, ``8 P_t`` Adam moments.
   - fsdp FULL_SHARD (fp32 shards, bf16 compute): ``(4 P + 4 P_t + 8 P_t) / G``, plus two
     gathered blocks in bf16 (the one computing and the one prefetched), ``2 * 2 * B_max``.
   - deepspeed_zero2: bf16 weights ``2 P`` on every GPU; bf16 gradients ``2 P_t / G``; fp32
     master weights and Adam moments ``12 P_t / G`` (ZeRO paper, K = 12).
   - deepspeed_zero3: ``(2 P + 2 P_t + 12 P_t) / G`` plus two gathered blocks ``2 * 2 * B_max``.

   Activations per sample (bf16, Korthikanti et al. 2022, attention kernels that keep no
   ``L x L`` matrix): ``34 * L * h`` bytes per transformer layer; with activation
   checkpointing (``gradient_checkpointing.*``, and always under fsdp, whose config
   checkpoints every block) ``2 * L * h`` per layer plus one layer's ``34 * L * h`` while it
   is recomputed. The decoder's logits add ``10 * L_text * V`` bytes (bf16 logits, their
   fp32 copy for the loss and its gradient). Encoders without trainable parameters keep no
   activations. Plus ``overhead_gb`` (CUDA context, allocator slack, buffers).
   Each card gets the largest micro-batch that fits (0: the weights and states alone do not).
5. Time for those amounts of compute, and for the configured run (``trainer.max_steps`` x
   ``data.batch_size`` x ``num_gpus`` x ``accumulate_grad_batches`` samples), at
   ``flops_per_second`` (the job's achieved throughput).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PreTrainedModel

from mmfuse.config import CONFIG_DIR
from mmfuse.freezing import ParamCount, apply_freezing, parameter_table
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import build_processor_and_model
from mmfuse.scale import block_classes, layer_classes
from mmfuse.types import ModalityTokens

GB = 1e9
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


@dataclass
class Component:
    """One component's share of the work per sample.

    ``trains``: its stack needs a backward pass (it, or something before it, trains);
    ``head_params``: weights after the stack that always train (an encoder's projection).
    """

    name: str
    tokens: int
    matmul_params: int
    attention_flops: float  # training FLOPs of the attention products per sample
    layers: int = 0
    width: int = 0
    trains: bool = True
    head_params: int = 0

    @property
    def flops(self) -> float:
        """Training FLOPs per sample (forward only, 2 per weight and token, where no
        backward is needed)."""
        factor = 6 if self.trains else 2
        stack = factor * self.matmul_params * self.tokens + self.attention_flops * factor / 6
        return stack + 6 * self.head_params * self.tokens


@dataclass
class Plan:
    """Everything the planner computes (see the module docstring)."""

    params: list[ParamCount]
    components: list[Component]
    text_tokens: int
    memory_tokens: int
    vocab_size: int
    largest_block: int
    decoder_trainable: int
    micro_batch: int
    checkpointing: dict[str, bool]
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def flops_per_sample(self) -> float:
        return sum(c.flops for c in self.components)


def build_on_meta(cfg: DictConfig) -> MMFuseModel:
    """The model of ``cfg`` on the meta device, with the freeze and LoRA configs applied."""
    with torch.device("meta"):
        _, model = build_processor_and_model(cfg)
    apply_freezing(model, _plain(cfg.get("freeze")))
    if cfg.get("lora"):
        from mmfuse.lora import apply_lora

        with torch.device("meta"):
            apply_lora(model, _plain(cfg.lora))
    return model


def make_plan(cfg: DictConfig) -> Plan:
    """Counts, FLOPs and memory for ``cfg`` (a composed ``plan`` or ``train`` config)."""
    model = build_on_meta(cfg)
    rows = parameter_table(model)
    proc = cfg.processor
    text = int(proc.max_length)
    media: dict[str, int] = {}
    parts: list[Component] = []
    trains_upstream = False
    for name, encoder in model.encoders.items():
        tokens = _encoder_tokens(name, encoder, cfg)
        if name != "text":
            media[name] = tokens
        layers, width = _stack(encoder.backbone)
        backbone = _matmul_params(encoder.backbone)
        trains_upstream |= _trainable(encoder)
        parts.append(
            Component(
                f"encoders.{name}",
                tokens,
                backbone,
                12.0 * layers * tokens**2 * width,
                layers,
                width,
                trains=_trainable(encoder.backbone),
                head_params=_matmul_params(encoder) - backbone,
            )
        )
    memory = _memory_tokens(model, media, parts)
    fusion_layers = len(getattr(model.fusion, "blocks", []) or [])
    d_model = int(cfg.model.d_model)
    media_total = sum(media.values())
    trains_upstream |= _trainable(model.fusion)
    parts.append(
        Component(
            "fusion",
            memory + media_total,
            _matmul_params(model.fusion),
            12.0 * fusion_layers * d_model * (memory**2 + memory * media_total),
            fusion_layers,
            d_model,
            trains=trains_upstream,
        )
    )
    trains_upstream |= _trainable(model.conditioning)
    parts.append(
        Component(
            "conditioning", memory, _matmul_params(model.conditioning), 0.0, trains=trains_upstream
        )
    )
    layers, width = _stack(model.decoder)
    length = memory + text
    parts.append(
        Component(
            "decoder",
            length,
            _matmul_params(model.decoder),
            12.0 * layers * length**2 * width,
            layers,
            width,
            trains=trains_upstream or _trainable(model.decoder),
        )
    )
    blocks = layer_classes(cfg.model)
    largest = max(
        (sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m) in blocks),
        default=0,
    )
    decoder_row = next(r for r in rows if r.component == "decoder")
    checkpointing = dict(_plain(cfg.get("gradient_checkpointing")) or {})
    plan = Plan(
        params=rows,
        components=parts,
        text_tokens=text,
        memory_tokens=memory,
        vocab_size=model.decoder.get_output_embeddings().weight.shape[0],
        largest_block=largest,
        decoder_trainable=decoder_row.trainable,
        micro_batch=int(cfg.data.batch_size),
        checkpointing={
            "decoder": bool(checkpointing.get("decoder")),
            "encoders": bool(checkpointing.get("encoders")),
        },
    )
    for strategy in STRATEGIES:
        plan.memory[strategy] = memory_per_gpu(plan, strategy, int(cfg.num_gpus))
    return plan


def memory_per_gpu(plan: Plan, strategy: str, gpus: int) -> dict[str, float]:
    """Bytes per GPU: weights, gradients, optimiser, gathered blocks, and activations per
    sample (the module docstring gives the formulas)."""
    total = next(r.total for r in plan.params if r.component == "total")
    trainable = next(r.trainable for r in plan.params if r.component == "total")
    gathered = 2 * 2 * plan.largest_block
    if strategy == "ddp":
        static = {"weights": 4 * total, "gradients": 4 * trainable, "optimizer": 8 * trainable}
    elif strategy == "fsdp":
        static = {
            "weights": 4 * total / gpus + gathered,
            "gradients": 4 * trainable / gpus,
            "optimizer": 8 * trainable / gpus,
        }
    elif strategy == "deepspeed_zero2":
        static = {
            "weights": 2 * total,
            "gradients": 2 * trainable / gpus,
            "optimizer": 12 * trainable / gpus,
        }
    elif strategy == "deepspeed_zero3":
        static = {
            "weights": 2 * total / gpus + gathered,
            "gradients": 2 * trainable / gpus,
            "optimizer": 12 * trainable / gpus,
        }
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    recompute = {
        "decoder": strategy == "fsdp" or plan.checkpointing["decoder"],
        "encoders": strategy == "fsdp" or plan.checkpointing["encoders"],
    }
    activations = 0.0
    for part in plan.components:
        if not part.trains:  # no backward: nothing kept for it
            continue
        kind = "decoder" if part.name == "decoder" else "encoders"
        activations += _activation_bytes(part.tokens, part.width, part.layers, recompute[kind])
        if part.name == "fusion" and part.layers:
            activations += _activation_bytes(part.tokens, part.width, part.layers, False)
    activations += 10.0 * plan.text_tokens * plan.vocab_size  # logits, fp32 copy, gradient
    return {**static, "activations_per_sample": activations}


def _activation_bytes(tokens: int, width: int, layers: int, recompute: bool) -> float:
    if not layers:
        return 0.0
    full_layer = 34.0 * tokens * width
    if recompute:
        return 2.0 * tokens * width * layers + full_layer
    return full_layer * layers


def max_micro_batch(memory: dict[str, float], card_gb: float, overhead_gb: float) -> int:
    """The largest micro-batch that fits on a card of ``card_gb`` (0: none)."""
    static = sum(v for k, v in memory.items() if k != "activations_per_sample")
    free = card_gb * GB - overhead_gb * GB - static
    return max(0, int(free // memory["activations_per_sample"])) if free > 0 else 0


# ----------------------------------------------------------------------------- model facts


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _matmul_params(module: nn.Module) -> int:
    """Weights of the Linear and convolution layers (a tied head counts again, as a matmul);
    the attention layers of ``nn.MultiheadAttention`` count their projections."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += sub.weight.numel()
        elif type(sub).__name__ == "Conv1D":  # transformers GPT-2 projection
            total += sub.weight.numel()
        elif isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None:
            total += sub.in_proj_weight.numel()
    return total


def _stack(module: nn.Module) -> tuple[int, int]:
    """(layers, width) of a transformer stack: from a transformers config, else from its
    block lists and embedding width."""
    config = getattr(module, "config", None)
    if isinstance(module, PreTrainedModel) and config is not None:
        return int(config.num_hidden_layers), int(config.hidden_size)
    blocks = [m for m in module.modules() if type(m) in block_classes(module)]
    width = int(getattr(module, "embed_dim", 0) or getattr(module, "num_features", 0) or 0)
    return len(blocks), width


def _encoder_tokens(name: str, encoder: nn.Module, cfg: DictConfig) -> int:
    backbone = encoder.backbone
    proc = cfg.processor
    if name == "image":
        patch_embed = getattr(backbone, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "num_patches", None):
            return int(patch_embed.num_patches) + int(getattr(backbone, "num_prefix_tokens", 0))
        config = getattr(backbone, "config", None)
        image = getattr(config, "image_size", int(proc.image.size))
        patch = int(getattr(config, "patch_size", 16))
        return (image // patch) ** 2 + 1
    if name == "audio":
        samples = int(float(proc.audio.max_seconds) * int(proc.audio.sample_rate))
        lengths = getattr(backbone, "_get_feat_extract_output_lengths", None)
        if lengths is not None:
            return int(lengths(torch.tensor(samples)))
        config = getattr(backbone, "config", None)
        return int(getattr(config, "max_source_positions", samples // 320))
    return int(proc.get("max_prompt_length") or proc.max_length)


def _memory_tokens(model: MMFuseModel, media: dict[str, int], parts: list[Component]) -> int:
    """M: the fusion's output length, from a meta forward (or its num_queries)."""
    d_model = model.d_model
    tokens = {}
    for name in model.encoders:
        length = media.get(name) or next(p.tokens for p in parts if p.name == f"encoders.{name}")
        feats = torch.empty(1, length, d_model, device="meta")
        tokens[name] = ModalityTokens(feats, torch.ones(1, length, dtype=torch.bool, device="meta"))
    try:
        with torch.no_grad():
            return int(model.fusion(tokens).feats.shape[1])
    except (RuntimeError, NotImplementedError, TypeError):
        return int(getattr(model.fusion, "num_queries", 0) or 1 + sum(media.values()))


# ----------------------------------------------------------------------------- report


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: Plan, cfg: DictConfig) -> str:
    """The plan as text."""
    out: list[str] = []
    out.append("Parameters (meta device; trainable after freeze/lora)")
    width = max(len(r.component) for r in plan.params)
    out.append(f"  {'component':<{width}}  {'total':>15}  {'trainable':>15}")
    out += [f"  {r.component:<{width}}  {r.total:>15,}  {r.trainable:>15,}" for r in plan.params]
    out.append("")
    out.append(
        f"Training FLOPs per sample (text T={plan.text_tokens}, memory M={plan.memory_tokens}, "
        f"decoder L={plan.text_tokens + plan.memory_tokens})"
    )
    out.append(f"  {'component':<16} {'tokens':>7} {'matmul params':>14} {'FLOPs':>10}  backward")
    for part in plan.components:
        out.append(
            f"  {part.name:<16} {part.tokens:>7} "
            f"{_count(part.matmul_params + part.head_params):>14} "
            f"{part.flops:>10.3e}  {'yes' if part.trains else 'no'}"
        )
    per_sample = plan.flops_per_sample
    out.append(f"  {'total':<16} {'':>7} {'':>14} {per_sample:>10.3e}")
    out.append(f"  per text token: {per_sample / plan.text_tokens:.3e}")
    out.append("")
    n = plan.decoder_trainable
    tokens = float(cfg.tokens_per_parameter) * n
    chinchilla = 6.0 * n * tokens
    samples = tokens / plan.text_tokens
    whole = samples * per_sample
    out.append(f"Chinchilla compute-optimal (trainable decoder N={_count(n)})")
    if n:
        out.append(f"  tokens D = {cfg.tokens_per_parameter} x N = {_count(tokens)}")
        out.append(f"  compute C = 6 N D = {chinchilla:.3e} FLOPs")
        out.append(
            f"  whole model on D text tokens: {_count(samples)} samples x {per_sample:.3e} = "
            f"{whole:.3e} FLOPs"
        )
    else:
        out.append("  the decoder is frozen: no compute-optimal size for it")
    out.append("")
    gpus = int(cfg.num_gpus)
    cards = [float(c) for c in cfg.gpu_memory_gb]
    overhead = float(cfg.overhead_gb)
    out.append(
        f"Memory per GPU, GB ({gpus} GPUs, bf16 mixed, AdamW; activations per sample; "
        f"+{overhead:g} overhead)"
    )
    header = "".join(f"  {c:g}GB:batch" for c in cards)
    out.append(
        f"  {'strategy':<16} {'weights':>8} {'grads':>8} {'adam':>8} {'act/smp':>8} "
        f"{'@batch':>8}{header}"
    )
    for strategy, memory in plan.memory.items():
        static = memory["weights"] + memory["gradients"] + memory["optimizer"]
        at_batch = static + plan.micro_batch * memory["activations_per_sample"] + overhead * GB
        fits = "".join(
            f"  {max_micro_batch(memory, c, overhead):>{len(f'{c:g}GB:batch')}}" for c in cards
        )
        out.append(
            f"  {strategy:<16} {memory['weights'] / GB:>8.2f} {memory['gradients'] / GB:>8.2f} "
            f"{memory['optimizer'] / GB:>8.2f} {memory['activations_per_sample'] / GB:>8.2f} "
            f"{at_batch / GB:>8.2f}{fits}"
        )
    out.append(
        f"  (@batch: total at data.batch_size={plan.micro_batch}; <card>:batch: largest "
        "micro-batch that fits, 0 = does not fit)"
    )
    out.append(
        "  (activation checkpointing: fsdp always; the others as gradient_checkpointing: "
        f"decoder={plan.checkpointing['decoder']}, encoders={plan.checkpointing['encoders']})"
    )
    out.append("")
    steps = int(cfg.trainer.max_steps)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    run_samples = steps * plan.micro_batch * gpus * accumulate if steps > 0 else 0
    run_flops = run_samples * per_sample
    if run_samples:
        out.append(
            f"Configured run: {steps} steps x {plan.micro_batch * gpus * accumulate} samples = "
            f"{_count(run_samples)} samples, {_count(run_samples * plan.text_tokens)} text "
            f"tokens, {run_flops:.3e} FLOPs"
        )
    throughput = cfg.get("flops_per_second")
    if throughput:
        throughput = float(throughput)
        out.append(f"Time at {throughput:.3e} FLOP/s")
        if n:
            out.append(f"  Chinchilla C (decoder only): {_duration(chinchilla / throughput)}")
            out.append(f"  whole model on D tokens:     {_duration(whole / throughput)}")
        if run_samples:
            out.append(f"  configured run:              {_duration(run_flops / throughput)}")
    else:
        out.append("Time: give flops_per_second=<achieved FLOP/s of the job>")
    return "\n".join(out)


def compose_plan(overrides: Sequence[str]) -> DictConfig:
    """The ``plan`` config (``train`` plus the planner options) with ``overrides``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("plan", overrides=list(overrides))


def main(argv: Sequence[str] | None = None) -> None:
    """``mmfuse-plan [overrides]``: prints the plan."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    cfg = compose_plan(args)
    print(format_plan(make_plan(cfg), cfg))


if __name__ == "__main__":
    main()
