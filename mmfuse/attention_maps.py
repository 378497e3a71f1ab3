"""Where the fusion looks: ``mmfuse-attention ckpt=<model dir> image=<png> audio=<wav>
prompt="..." output_dir=<dir>``.

The fusion's attention over the media, for one input, as PNG heatmaps: over the image
patches (on the image) and over the audio frames (on the waveform), averaged over heads and
queries, for each layer and averaged over layers. Which attention that is:

- ``cross_attention`` and ``qformer``: each block's cross-attention of the queries over
  ``[null token; image tokens; audio frames]``;
- ``perceiver``: each layer of each modality's resampler, the latents over
  ``[its media tokens; latents]`` (the part over the media is shown);
- ``concat``: none. Its memory is the projected media tokens themselves, with no attention
  in the fusion, so there is no map to draw (an error says so).

The image's token layout comes from the vision encoder: the class token (prefix tokens) is
left out of the map and the patch tokens form its grid (8x8 for the conv-stem hybrid at
64x64). The maps show each patch's (frame's) share of the attention the modality gets; the
title gives that modality's share of all the attention (the rest goes to the null token,
the latents, the class token or the other modality).

Weights are captured by :func:`capture_attention`: inside it, the ``Attention`` modules
compute explicit softmax weights and hand them over; outside, the fused SDPA path runs and
nothing is kept. Outputs: ``image_attention.png``, ``image_attention_layer<k>.png``,
``audio_attention.png``, ``audio_attention_layer<k>.png`` and ``attention.json`` (the
numbers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from mmfuse.allocator import keep_freed_memory
from mmfuse.config import CONFIG_DIR
from mmfuse.generation import GenerationConfig, generate
from mmfuse.model import MMFuseModel
from mmfuse.modules.attention import Attention
from mmfuse.modules.fusion import PROMPT, CrossAttentionFusion
from mmfuse.modules.fusion_concat import ConcatFusion
from mmfuse.modules.fusion_perceiver import PerceiverFusion
from mmfuse.modules.fusion_qformer import QFormerFusion
from mmfuse.processing.collate import Collator
from mmfuse.processing.processor import Processor
from mmfuse.types import Batch, ModalityTokens

DPI = 100
IMAGE_FIGSIZE = (8.0, 4.0)  # inches: 800 x 400 pixels
AUDIO_FIGSIZE = (10.0, 4.0)  # 1000 x 400 pixels
MEDIA = ("image", "audio")


# ----------------------------------------------------------------------------- capture


@contextmanager
def capture_attention(module: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Records the attention weights of every ``Attention`` inside ``module``.

    Yields:
        ``{module name: [weights (B, h, L, S) of each call, in order]}``, filled as the
        module runs. On exit the modules are as before: fused SDPA, nothing recorded.
    """
    layers = {n: m for n, m in module.named_modules() if isinstance(m, Attention)}
    records: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    try:
        for name, layer in layers.items():
            layer.recorder = records[name].append
        yield records
    finally:
        for layer in layers.values():
            layer.__dict__.pop("recorder", None)


@contextmanager
def _token_counts(model: MMFuseModel) -> Iterator[dict[str, ModalityTokens]]:
    """The tokens each encoder hands the fusion, while inside."""
    tokens: dict[str, ModalityTokens] = {}
    with ExitStack() as stack:
        for name, encoder in model.encoders.items():

            def keep(_module, _inputs, output, name=name) -> None:
                tokens[name] = output

            stack.callback(encoder.register_forward_hook(keep).remove)
        yield tokens


# ----------------------------------------------------------------------------- layout


@dataclass
class MediaLayer:
    """One attention layer whose keys include media tokens.

    Attributes:
        name: the ``Attention`` module's name inside the fusion.
        label: a short name for files and titles (``layer0``, ``image layer1``...).
        segments: ``{modality: slice of the keys holding its tokens}``.
    """

    name: str
    label: str
    segments: dict[str, slice]


def media_layers(fusion: nn.Module, lengths: Mapping[str, int]) -> list[MediaLayer]:
    """The fusion's attention layers over media and where each modality's keys are.

    Args:
        fusion: a cross-attention, Q-Former or Perceiver fusion.
        lengths: tokens per modality, as the encoders gave them.

    Raises:
        ValueError: for a fusion without attention over the media (concat), or unknown.
    """
    if isinstance(fusion, (CrossAttentionFusion, QFormerFusion)):
        segments, start = {}, 1  # key 0: the null token
        for name in fusion.modalities:
            if name == PROMPT:
                continue
            segments[name] = slice(start, start + lengths[name])
            start += lengths[name]
        return [
            MediaLayer(f"blocks.{i}.cross", f"layer{i}", dict(segments))
            for i in range(len(fusion.blocks))
        ]
    if isinstance(fusion, PerceiverFusion):
        return [
            MediaLayer(f"resamplers.{m}.layers.{i}.attn", f"layer{i}", {m: slice(0, lengths[m])})
            for m in fusion.media
            for i in range(len(fusion.resamplers[m].layers))
        ]
    if isinstance(fusion, ConcatFusion):
        raise ValueError(
            "model.fusion is concat (ConcatFusion): it has no attention; its memory is the "
            "projected media tokens themselves, so there is no attention map to draw (the "
            "decoder's own attention over them is another matter). Use a model with "
            "cross_attention, qformer or perceiver fusion."
        )
    raise ValueError(f"attention maps: unknown fusion {type(fusion).__name__}")


def image_grid(encoder: nn.Module, num_tokens: int) -> tuple[int, tuple[int, int]]:
    """(prefix tokens, (rows, columns) of the patch grid) of a vision encoder's tokens.

    timm ViTs give ``num_prefix_tokens`` and ``patch_embed.grid_size`` (the conv-stem hybrid
    too); otherwise the class token is assumed when the rest is a square.

    Raises:
        ValueError: the tokens do not form a grid.
    """
    backbone = getattr(encoder, "backbone", encoder)
    prefix = getattr(backbone, "num_prefix_tokens", None)
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if prefix is not None and grid is not None and prefix + grid[0] * grid[1] == num_tokens:
        return int(prefix), (int(grid[0]), int(grid[1]))
    for prefix in (1, 0, 2):
        side = math.isqrt(max(num_tokens - prefix, 0))
        if side and side * side == num_tokens - prefix:
            return prefix, (side, side)
    raise ValueError(f"{num_tokens} image tokens form no square patch grid")


# ----------------------------------------------------------------------------- maps


@dataclass
class LayerMap:
    """One layer's attention over the media, averaged over heads and queries.

    Attributes:
        label: the layer's short name.
        image: (rows, columns) share of the image attention per patch (sums to 1), or None.
        image_share: the share of all the layer's attention on the image patches.
        class_share: the share on the image's prefix (class) tokens.
        audio: (frames,) share of the audio attention per valid frame (sums to 1), or None.
        audio_share: the share of all the layer's attention on the audio frames.
    """

    label: str
    image: np.ndarray | None = None
    image_share: float = 0.0
    class_share: float = 0.0
    audio: np.ndarray | None = None
    audio_share: float = 0.0


@dataclass
class AttentionMaps:
    """The fusion's attention for one input.

    Attributes:
        layers: per layer (a Perceiver: per modality and layer).
        mean: the average over the layers (per modality).
        prompt: the prompt.
        answer: the model's greedy answer ("" when not generated).
        fusion: the fusion's class name.
        grid: the image patch grid, or None without an image.
        seconds_per_frame: audio frame spacing, or None without audio.
    """

    layers: list[LayerMap]
    mean: LayerMap
    prompt: str = ""
    answer: str = ""
    fusion: str = ""
    grid: tuple[int, int] | None = None
    seconds_per_frame: float | None = None


def _share(values: np.ndarray) -> tuple[np.ndarray, float]:
    total = float(values.sum())
    return (values / total if total > 0 else values), total


def fusion_attention(model: MMFuseModel, batch: Batch) -> AttentionMaps:
    """The attention maps of the fusion for the first record of ``batch``.

    Raises:
        ValueError: for a fusion without attention over the media (concat).
    """
    if isinstance(model.fusion, ConcatFusion):
        media_layers(model.fusion, {})  # raises, naming the reason
    with torch.no_grad(), _token_counts(model) as tokens, capture_attention(model.fusion) as rec:
        model.encode(batch)
    lengths = {name: t.feats.shape[1] for name, t in tokens.items()}
    valid = {name: t.mask[0] for name, t in tokens.items()}
    prefix, grid = 0, None
    present = {m for m in MEDIA if m in valid and bool(valid[m].any())}
    if "image" in present:
        prefix, grid = image_grid(model.encoders["image"], lengths["image"])
    layers: list[LayerMap] = []
    for layer in media_layers(model.fusion, lengths):
        (weights,) = rec[layer.name]  # one call per encode
        keys = weights[0].float().mean(dim=(0, 1)).numpy()  # (S,): heads and queries averaged
        modality = next(iter(layer.segments)) if len(layer.segments) == 1 else None
        out = LayerMap(f"{modality} {layer.label}" if modality else layer.label)
        for name, part in layer.segments.items():
            if name not in present:
                continue
            values = keys[part]
            if name == "image":
                patches = values[prefix:]
                out.image, out.image_share = _share(patches.reshape(grid))
                out.class_share = float(values[:prefix].sum())
            else:
                frames = values[: int(valid[name].sum())]
                out.audio, out.audio_share = _share(frames)
        layers.append(out)
    return AttentionMaps(layers, _mean(layers), fusion=type(model.fusion).__name__, grid=grid)


def _mean(layers: list[LayerMap]) -> LayerMap:
    mean = LayerMap("mean over layers")
    images = [m for m in layers if m.image is not None]
    audios = [m for m in layers if m.audio is not None]
    if images:
        mean.image, _ = _share(np.mean([m.image for m in images], axis=0))
        mean.image_share = float(np.mean([m.image_share for m in images]))
        mean.class_share = float(np.mean([m.class_share for m in images]))
    if audios:
        mean.audio, _ = _share(np.mean([m.audio for m in audios], axis=0))
        mean.audio_share = float(np.mean([m.audio_share for m in audios]))
    return mean


# ----------------------------------------------------------------------------- input


def prompt_batch(
    processor: Processor, prompt: str, image: str | None = None, audio: str | None = None
) -> Batch:
    """A one-record generation batch: the media files and the prompt in one user turn."""
    content: list[dict] = []
    if image:
        content.append({"type": "image", "path": str(Path(image).resolve())})
    if audio:
        content.append({"type": "audio", "path": str(Path(audio).resolve())})
    content.append({"type": "text", "text": prompt})
    sample = processor.prompt([{"role": "user", "content": content}])
    collate = Collator(processor.tokenizer.pad_token_id, "left", processor.image.size)
    return collate([sample])


def attention_maps(
    model: MMFuseModel,
    processor: Processor,
    prompt: str,
    image: str | None = None,
    audio: str | None = None,
    max_new_tokens: int = 32,
) -> AttentionMaps:
    """The fusion's attention maps for one input, with the model's greedy answer."""
    if not image and not audio:
        raise ValueError("attention maps need image=<file> or audio=<file> (or both)")
    device = next(model.parameters()).device
    batch = prompt_batch(processor, prompt, image, audio).to(device)
    maps = fusion_attention(model, batch)
    maps.prompt = prompt
    if max_new_tokens > 0:
        ids = generate(model, batch, GenerationConfig(max_new_tokens=max_new_tokens))[0]
        maps.answer = processor.tokenizer.decode(ids, skip_special_tokens=True)
    if audio:
        frames = next((m.audio for m in maps.layers if m.audio is not None), None)
        seconds = int(batch.audio_lengths[0]) / processor.audio.sample_rate
        if frames is not None and len(frames):
            maps.seconds_per_frame = seconds / len(frames)
    return maps


# ----------------------------------------------------------------------------- drawing


def _title(maps: AttentionMaps, layer: LayerMap) -> str:
    answer = f" -> {maps.answer!r}" if maps.answer else ""
    return f"{maps.fusion}, {layer.label}: {maps.prompt!r}{answer}"


def plot_image(maps: AttentionMaps, layer: LayerMap, image: str | Path, path: Path) -> Path:
    """The patch map over the image (left) and as a grid with values (right)."""
    from matplotlib.figure import Figure

    picture = np.asarray(Image.open(image).convert("RGB"))
    height, width = picture.shape[:2]
    fig = Figure(figsize=IMAGE_FIGSIZE, dpi=DPI)
    left, right = fig.subplots(1, 2)
    left.imshow(picture, extent=(0, width, height, 0))
    left.imshow(layer.image, cmap="jet", alpha=0.4, extent=(0, width, height, 0))
    left.set_title("over the image", fontsize=9)
    shown = right.imshow(layer.image, cmap="viridis")
    rows, cols = layer.image.shape
    if rows * cols <= 64:
        for r in range(rows):
            for c in range(cols):
                right.text(
                    c,
                    r,
                    f"{layer.image[r, c]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w",
                )
    right.set_title(
        f"per patch ({rows}x{cols}); image {layer.image_share:.0%}, class token "
        f"{layer.class_share:.0%} of all",
        fontsize=8,
    )
    fig.colorbar(shown, ax=right, fraction=0.046)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(_title(maps, layer), fontsize=9)
    fig.savefig(path, dpi=DPI)
    return path


def plot_audio(
    maps: AttentionMaps, layer: LayerMap, wave: np.ndarray, rate: int, path: Path
) -> Path:
    """The waveform with each frame shaded by its attention (top), the frames as bars
    (bottom)."""
    from matplotlib.figure import Figure

    spacing = maps.seconds_per_frame or len(wave) / rate / max(len(layer.audio), 1)
    starts = np.arange(len(layer.audio)) * spacing
    fig = Figure(figsize=AUDIO_FIGSIZE, dpi=DPI)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(np.arange(len(wave)) / rate, wave, color="0.3", linewidth=0.5)
    peak = float(layer.audio.max()) or 1.0
    for start, value in zip(starts, layer.audio, strict=True):
        top.axvspan(start, start + spacing, color="red", alpha=0.6 * float(value) / peak, lw=0)
    top.set_ylabel("waveform")
    bottom.bar(starts, layer.audio, width=spacing, align="edge", color="C3")
    bottom.set_ylabel("attention")
    bottom.set_xlabel(f"seconds ({len(layer.audio)} frames; audio {layer.audio_share:.0%} of all)")
    fig.suptitle(_title(maps, layer), fontsize=9)
    fig.savefig(path, dpi=DPI)
    return path


def save_attention_maps(
    maps: AttentionMaps,
    out_dir: str | Path,
    image: str | Path | None = None,
    wave: np.ndarray | None = None,
    rate: int = 16000,
) -> list[Path]:
    """Writes the PNGs (mean over layers, then each layer) and ``attention.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for modality in MEDIA:
        numbered: dict[str, int] = {}
        for layer in [maps.mean, *maps.layers]:
            values = getattr(layer, modality)
            if values is None:
                continue
            if layer is maps.mean:
                name = f"{modality}_attention.png"
            else:
                k = numbered[modality] = numbered.get(modality, -1) + 1
                name = f"{modality}_attention_layer{k}.png"
            if modality == "image" and image is not None:
                written.append(plot_image(maps, layer, image, out / name))
            elif modality == "audio" and wave is not None:
                written.append(plot_audio(maps, layer, wave, rate, out / name))
    content = {
        "fusion": maps.fusion,
        "prompt": maps.prompt,
        "answer": maps.answer,
        "grid": maps.grid,
        "seconds_per_frame": maps.seconds_per_frame,
        "layers": [_as_json(layer) for layer in [maps.mean, *maps.layers]],
    }
    (out / "attention.json").write_text(json.dumps(content, indent=1) + "\n")
    return [*written, out / "attention.json"]


def _as_json(layer: LayerMap) -> dict:
    return {
        "label": layer.label,
        "image": None if layer.image is None else layer.image.round(5).tolist(),
        "image_share": layer.image_share,
        "class_share": layer.class_share,
        "audio": None if layer.audio is None else layer.audio.round(5).tolist(),
        "audio_share": layer.audio_share,
    }


# ----------------------------------------------------------------------------- main


def run(cfg: DictConfig) -> list[Path]:
    """Loads the model, computes the maps of ``cfg``'s input and writes them."""
    from mmfuse.model_dir import load_model_dir

    model, processor = load_model_dir(cfg.ckpt, cfg.device)
    if isinstance(model.fusion, ConcatFusion):
        media_layers(model.fusion, {})  # fails before any work, saying why
    maps = attention_maps(model, processor, cfg.prompt, cfg.image, cfg.audio, cfg.max_new_tokens)
    wave = processor.audio.load(cfg.audio).numpy() if cfg.audio else None
    written = save_attention_maps(
        maps, cfg.output_dir, cfg.image, wave, processor.audio.sample_rate
    )
    if maps.answer:
        print(f"answer: {maps.answer}")
    for layer in [maps.mean, *maps.layers]:
        shares = []
        if layer.image is not None:
            shares.append(f"image {layer.image_share:.0%} (class token {layer.class_share:.0%})")
        if layer.audio is not None:
            shares.append(f"audio {layer.audio_share:.0%}")
        print(f"{layer.label}: attention on {', '.join(shares)}")
    print(f"attention maps written to {Path(cfg.output_dir)} ({len(written)} files)")
    return written


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="attention")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper around :func:`run`; a bad input or model stops with its reason."""
    keep_freed_memory()
    try:
        run(cfg)
    except ValueError as err:
        raise SystemExit(f"mmfuse-attention: {err}") from err


if __name__ == "__main__":
    main()
