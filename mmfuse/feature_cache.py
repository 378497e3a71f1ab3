"""Frozen-encoder feature cache: encoder outputs computed once, stored on disk, read back.

With ``data.cache_features=true`` and every media encoder's backbone frozen (everything but
its ``proj`` output layer: ``freeze=encoders``, ``freeze=alignment`` or the whole encoder),
each record's image and audio go through their frozen encoder once; the features before
``proj`` are written to safetensors files and training reads them instead of decoding media
and running the encoders (``mmfuse.encoding.project_features`` applies ``proj``, which may
train).

Layout::

    <cache_dir>/<modality>-<key>/<data digest>/part-<rank>-of-<ranks>-<piece>.safetensors
                                              /done-<rank>-of-<ranks>.json

- ``key`` hashes the encoder's weights (all but ``proj``), its class, and the preprocessing
  settings of the modality (``ImageProcessor.settings``/``AudioProcessor.settings``): a
  changed encoder or preprocessing makes a new key, never a stale read.
- ``data digest`` hashes the records (after any task filter) and the size and modification
  time of every media file they name: an edited file makes a new digest.
- Each rank computes the records ``rank::ranks`` (the work is shared under DDP) and writes
  its pieces and then its ``done`` file (listing pieces and the records whose media could
  not be used, with the reason); a complete set of ``done`` files, for any number of ranks,
  is a usable cache.

Training augmentation (``processor.image.augment``, ``processor.audio.augment``) changes the
inputs every epoch, so it cannot be cached: that combination is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmfuse.encoding import encode_audio_chunks, without_projection
from mmfuse.processing.errors import MEDIA_MISMATCH, InputError
from mmfuse.processing.processor import Processor
from mmfuse.types import MODALITIES

log = logging.getLogger(__name__)

PIECE_RECORDS = 2048  # records per safetensors piece (bounds the memory of a fill)


def check_not_augmented(processor: Processor) -> None:
    """Refuses training augmentation, whose inputs change every epoch.

    Raises:
        ValueError: naming the augmentation settings.
    """
    if not processor.augments:
        return
    which = [
        f"processor.{kind}.augment={dict(loader.augment)}"
        for kind, loader in (("image", processor.image), ("audio", processor.audio))
        if loader.augments
    ]
    raise ValueError(
        "data.cache_features=true with training augmentation ("
        + ", ".join(which)
        + "): augmented inputs change every epoch, so their features cannot be computed "
        "once; turn the augmentation off or set data.cache_features=false"
    )


def check_cacheable(model: nn.Module, processor: Processor) -> list[str]:
    """The media modalities whose features can be cached; raises when one cannot.

    Raises:
        ValueError: naming the encoder with trainable backbone parameters, or the training
            augmentation that changes the inputs every epoch.
    """
    check_not_augmented(processor)
    kinds = [kind for kind in MODALITIES if kind in model.encoders]
    for kind in kinds:
        trainable = [
            name
            for name, param in model.encoders[kind].named_parameters()
            if param.requires_grad and not name.startswith("proj.")
        ]
        if trainable:
            raise ValueError(
                f"data.cache_features=true but encoders.{kind} is not frozen ({len(trainable)} "
                f"trainable parameter tensors besides proj, e.g. {trainable[:2]}): freeze its "
                "backbone (freeze=encoders or freeze=alignment) or set data.cache_features=false"
            )
    if not kinds:
        raise ValueError("data.cache_features=true but the model has no image or audio encoder")
    return kinds


def cache_key(encoder: nn.Module, settings: dict[str, Any]) -> str:
    """Hash of the encoder's weights (all but ``proj``), its class and ``settings``."""
    digest = hashlib.sha256()
    digest.update(f"{type(encoder).__module__}.{type(encoder).__qualname__}".encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        if name.startswith("proj."):
            continue
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def data_digest(records: Sequence[dict], base_dir: Path) -> str:
    """Hash of the records and of the size and modification time of their media files."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
        for path in _media_paths(record, base_dir).values():
            try:
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(f"{path}:missing".encode())
    return digest.hexdigest()[:20]


def _media_paths(record: dict, base_dir: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for message in record.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") in MODALITIES and "path" in part:
                paths.setdefault(part["type"], base_dir / str(part["path"]))
    return paths


def _media_parts(record: dict) -> dict[str, list[dict]]:
    parts: dict[str, list[dict]] = {}
    for message in record.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") in MODALITIES:
                parts.setdefault(part["type"], []).append(part)
    return parts


class FeatureStore:
    """Read side of the cache for one data set: ``get(index)`` -> ``{modality: (N, D')
    features or the InputError met}``. Picklable (file handles open lazily per process)."""

    def __init__(self, locations: dict[str, dict[str, Any]]) -> None:
        self.locations = locations  # kind -> {"pieces", "piece", "start", "end", "bad"}
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"locations": self.locations, "_handles": {}}

    def get(self, index: int) -> dict[str, torch.Tensor | InputError]:
        out: dict[str, torch.Tensor | InputError] = {}
        for kind, where in self.locations.items():
            bad = where["bad"].get(int(index))
            if bad is not None:
                out[kind] = InputError(bad[1], bad[0])
                continue
            piece = int(where["piece"][index])
            if piece < 0:
                continue
            path = where["pieces"][piece]
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(path, framework="pt")
            start, end = int(where["start"][index]), int(where["end"][index])
            out[kind] = handle.get_slice("feats")[start:end]
        return out


class _MediaItems(Dataset):
    """(record index, loaded media or the InputError) for one modality."""

    def __init__(self, items: list[tuple[int, dict]], kind: str, processor: Processor, base: Path):
        self.items, self.kind, self.processor, self.base = items, kind, processor, base

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | InputError]:
        index, part = self.items[i]
        loader = self.processor.image if self.kind == "image" else self.processor.audio
        try:
            if "path" not in part:
                raise InputError(f"{self.kind} part has no 'path'")
            return index, loader.load(self.base / str(part["path"]))
        except InputError as err:
            return index, err


def build_store(
    records: Sequence[dict],
    base_dir: str | Path,
    model: nn.Module,
    processor: Processor,
    cache_dir: str | Path,
    rank: int = 0,
    ranks: int = 1,
    barrier: Callable[[], None] = lambda: None,
    batch_size: int = 32,
    num_workers: int = 0,
    keys: dict[str, str] | None = None,
) -> FeatureStore:
    """Fills what the cache lacks for ``records`` (this rank's share) and returns the store.

    Args:
        records: the data set's records (indices are positions in this list).
        base_dir: directory the media paths are relative to.
        model: the ``MMFuseModel`` (its frozen encoders; on their training device).
        processor: the preprocessing (its image and audio loaders).
        cache_dir: root of the cache.
        rank, ranks, barrier: this process's share and a barrier over all of them.
        batch_size, num_workers: of the loader that decodes media for the fill.
        keys: ``{modality: cache_key}`` already computed (hashing large encoders takes a
            while), else computed here.
    """
    base = Path(base_dir)
    kinds = check_cacheable(model, processor)
    digest = data_digest(records, base)
    locations = {}
    for kind in kinds:
        encoder = model.encoders[kind]
        loader = processor.image if kind == "image" else processor.audio
        key = (keys or {}).get(kind) or cache_key(encoder, loader.settings())
        directory = Path(cache_dir) / f"{kind}-{key}" / digest
        complete = _complete_ranks(directory)
        if complete is None:
            _fill(
                records,
                base,
                kind,
                encoder,
                processor,
                directory,
                rank,
                ranks,
                batch_size,
                num_workers,
            )
            barrier()
            complete = _complete_ranks(directory)
            if complete is None:
                raise RuntimeError(f"feature cache {directory}: incomplete after filling")
        else:
            log.info(
                "feature cache: %s features of %d records from %s", kind, len(records), directory
            )
        locations[kind] = _locations(directory, complete, len(records))
    return FeatureStore(locations)


def _complete_ranks(directory: Path) -> int | None:
    """The number of ranks of a complete set of ``done`` files, or None."""
    for path in sorted(directory.glob("done-*-of-*.json")):
        ranks = int(path.stem.rsplit("-of-", 1)[1])
        if all((directory / f"done-{r:03d}-of-{ranks:03d}.json").is_file() for r in range(ranks)):
            return ranks
    return None


def _locations(directory: Path, ranks: int, count: int) -> dict[str, Any]:
    pieces: list[str] = []
    piece = np.full(count, -1, dtype=np.int32)
    start = np.zeros(count, dtype=np.int64)
    end = np.zeros(count, dtype=np.int64)
    bad: dict[int, tuple[str, str]] = {}
    for rank in range(ranks):
        done = json.loads((directory / f"done-{rank:03d}-of-{ranks:03d}.json").read_text())
        bad.update({int(i): (reason, detail) for i, (reason, detail) in done["bad"].items()})
        for name in done["pieces"]:
            path = str(directory / name)
            with safe_open(path, framework="pt") as handle:
                index = handle.get_tensor("index").numpy()
                offsets = handle.get_tensor("offsets").numpy()
            if index.size and int(index.max()) >= count:
                raise RuntimeError(f"feature cache {path}: record {index.max()} out of range")
            piece[index] = len(pieces)
            start[index], end[index] = offsets[:-1], offsets[1:]
            pieces.append(path)
    return {"pieces": pieces, "piece": piece, "start": start, "end": end, "bad": bad}


def _fill(
    records: Sequence[dict],
    base: Path,
    kind: str,
    encoder: nn.Module,
    processor: Processor,
    directory: Path,
    rank: int,
    ranks: int,
    batch_size: int,
    num_workers: int,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    items, bad = [], {}
    for index in range(rank, len(records), ranks):
        parts = _media_parts(records[index]).get(kind, [])
        if len(parts) > 1:
            bad[index] = (MEDIA_MISMATCH, f"media mismatch: more than one {kind} part")
        elif parts:
            items.append((index, parts[0]))
    log.info(
        "feature cache: computing %s features of %d records into %s", kind, len(items), directory
    )
    loader = DataLoader(
        _MediaItems(items, kind, processor, base),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
    )
    pieces: list[str] = []
    written: list[tuple[int, torch.Tensor]] = []
    device = next(encoder.parameters()).device
    modes = [(module, module.training) for module in encoder.modules()]
    encoder.eval()
    try:
        for batch in loader:
            good = []
            for index, value in batch:
                if isinstance(value, InputError):
                    bad[index] = (value.reason, str(value))
                else:
                    good.append((index, value))
            for index, feats in _encode(encoder, kind, good, processor, device):
                written.append((index, feats))
            if len(written) >= PIECE_RECORDS:
                pieces.append(_write_piece(directory, rank, ranks, len(pieces), written))
                written = []
        if written or not pieces:
            pieces.append(_write_piece(directory, rank, ranks, len(pieces), written))
    finally:  # each module's own mode back (train() would wake frozen parts too)
        for module, mode in modes:
            module.training = mode
    done = {"pieces": pieces, "bad": {str(i): list(v) for i, v in sorted(bad.items())}}
    _atomic_write(directory / f"done-{rank:03d}-of-{ranks:03d}.json", json.dumps(done).encode())


@torch.no_grad()
def _encode(
    encoder: nn.Module,
    kind: str,
    good: list[tuple[int, torch.Tensor]],
    processor: Processor,
    device: torch.device,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Pre-projection features (n_i, D') of each loaded input, only the real tokens."""
    if not good:
        return
    values = [value for _, value in good]
    with without_projection(encoder):
        if kind == "image":
            pixels = torch.stack(values).to(device)
            out = encoder(pixels, torch.ones(len(values), dtype=torch.bool, device=device))
        else:
            lengths = torch.tensor([v.shape[0] for v in values], device=device)
            waves = torch.zeros((len(values), int(lengths.max())), device=device)
            for row, value in enumerate(values):
                waves[row, : value.shape[0]] = value
            chunk = processor.audio.chunk_samples
            out = (
                encode_audio_chunks(encoder, waves, lengths, chunk)
                if chunk
                else encoder(waves, lengths)
            )
    for row, (index, _) in enumerate(good):
        yield index, out.feats[row][out.mask[row]].float().cpu()


def _write_piece(
    directory: Path, rank: int, ranks: int, number: int, written: list[tuple[int, torch.Tensor]]
) -> str:
    name = f"part-{rank:03d}-of-{ranks:03d}-{number:04d}.safetensors"
    sizes = [feats.shape[0] for _, feats in written]
    width = written[0][1].shape[1] if written else 0
    tensors = {
        "feats": torch.cat([f for _, f in written]) if written else torch.zeros((0, width)),
        "index": torch.tensor([i for i, _ in written], dtype=torch.long),
        "offsets": torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.long),
    }
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / name)
    return name


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
