"""The model passes a task needs, over a list of records (one shard of them in DDP).

- ``generate_rows``: batched generation (left padding, KV cache) -> one row per record with
  ``prediction`` and the references the processor carried into the batch.
- ``option_logprobs``: teacher-forced log-probability of every option of a multiple-choice
  record (the option as the assistant's answer).
- ``conversation_nll``: summed negative log-likelihood and count of the assistant tokens of
  whole conversations (perplexity).

Records are batched in order of task and length, and results come back in record order.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mmfuse.evaluation.tasks import LETTERS, ChoiceConfig
from mmfuse.generation import GenerationConfig, generate
from mmfuse.model import MMFuseModel
from mmfuse.processing.collate import Collator
from mmfuse.processing.processor import Processor
from mmfuse.processing.text import IGNORE_INDEX, encode_conversation
from mmfuse.types import MODALITIES, Batch, Sample


@dataclass
class Pass:
    """What a model pass runs on.

    Attributes:
        model: the model (eval mode).
        processor: record -> Sample.
        base_dir: media paths in the records are relative to it.
        source: the data file, named in errors.
        drop_modalities: media kinds removed from every record.
        batch_size: records (or options) per forward pass.
        num_workers: loader processes.
    """

    model: MMFuseModel
    processor: Processor
    base_dir: Path
    source: str
    drop_modalities: Sequence[str] = ()
    batch_size: int = 16
    num_workers: int = 0


class _Records(Dataset):
    """Records processed on access. It holds the processor and the pass's settings, not the
    pass itself: loader workers started by spawn or forkserver (macOS's default, Python
    3.14's on Linux) get a pickled copy, and the model does not pickle (nor should it
    travel)."""

    def __init__(self, records: Sequence[dict], run: Pass, for_generation: bool) -> None:
        self.records, self.for_generation = records, for_generation
        self.processor, self.base_dir, self.source = run.processor, run.base_dir, run.source
        self.drop_modalities = run.drop_modalities

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.processor(
            self.records[index],
            self.base_dir,
            self.source,
            for_generation=self.for_generation,
            drop_modalities=self.drop_modalities,
        )


def check_modalities(drop: Sequence[str]) -> None:
    unknown = set(drop) - set(MODALITIES)
    if unknown:
        raise ValueError(f"drop_modalities: unknown {sorted(unknown)}; choose from {MODALITIES}")


def _batches(
    records: Sequence[dict], run: Pass, for_generation: bool, side: str
) -> Iterator[tuple[list[int], Batch]]:
    """Yields (record indices, batch on the model's device), batched by task and length."""
    check_modalities(run.drop_modalities)
    order = sorted(
        range(len(records)),
        key=lambda i: (str(records[i].get("task", "")), len(json.dumps(records[i]))),
    )
    ordered = [records[i] for i in order]
    processor = run.processor
    loader = DataLoader(
        _Records(ordered, run, for_generation),
        batch_size=run.batch_size,
        num_workers=run.num_workers,
        collate_fn=Collator(processor.tokenizer.pad_token_id, side, processor.image.size),
    )
    device = next(run.model.parameters()).device
    start = 0
    for batch in loader:
        yield order[start : start + len(batch)], batch.to(device)
        start += len(batch)


@torch.no_grad()
def generate_rows(
    records: Sequence[dict], run: Pass, generation: GenerationConfig, default_task: str = ""
) -> list[dict]:
    """One ``{"id", "task", "prediction", "reference", "references"}`` row per record."""
    rows: list[dict | None] = [None] * len(records)
    decode = run.processor.tokenizer.batch_decode
    for indices, batch in _batches(records, run, True, "left"):
        texts = decode(generate(run.model, batch, generation), skip_special_tokens=True)
        for j, index in enumerate(indices):
            rows[index] = {
                "id": batch.ids[j],
                "task": batch.tasks[j] or default_task,
                "prediction": texts[j],
                "reference": batch.references[j],
                "references": list(batch.all_references[j] or []),
            }
    return rows  # type: ignore[return-value]


def _supervised_logprobs(model: MMFuseModel, batch: Batch) -> list[torch.Tensor]:
    """Per row, the log-probability of every supervised token given the ones before."""
    logits, labels = model(batch)  # (B, L, V), (B, L)
    targets = labels[:, 1:]  # (B, L-1)
    mask = targets != IGNORE_INDEX
    picked = logits[:, :-1][mask].float().log_softmax(dim=-1)  # (N, V)
    values = picked.gather(1, targets[mask][:, None]).squeeze(1)  # (N,)
    return list(values.split(mask.sum(dim=1).tolist()))


def _last_span(mask_row: torch.Tensor) -> tuple[int, int]:
    """(start, end) of the last run of True in a 1-D bool tensor."""
    positions = mask_row.nonzero().squeeze(1).tolist()
    end = positions[-1] + 1
    start = end - 1
    while start - 1 >= 0 and bool(mask_row[start - 1]):
        start -= 1
    return start, end


def end_token_count(processor: Processor) -> int:
    """How many supervised tokens the chat template puts after an assistant answer."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ""}]},
    ]
    _, labels = encode_conversation(processor.tokenizer, messages)
    return sum(label != IGNORE_INDEX for label in labels)


def _with_answer(record: dict, answer: str) -> dict:
    out = copy.deepcopy(record)
    messages = out["messages"]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    messages[last] = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    return out


@torch.no_grad()
def option_logprobs(
    records: Sequence[dict], run: Pass, settings: ChoiceConfig
) -> list[dict[str, list]]:
    """Per record ``{"option_logprobs": [sum per option], "option_tokens": [count]}``: each
    option (its text, or its letter) scored as the last assistant answer."""
    flat, owners = [], []
    for i, record in enumerate(records):
        for k, text in enumerate(record["choices"]):
            answer = text if settings.target == "text" else LETTERS[k]
            flat.append(_with_answer(record, answer))
            owners.append(i)
    n_end = 0 if settings.include_end_token else end_token_count(run.processor)
    sums: list[float] = [0.0] * len(flat)
    counts: list[int] = [0] * len(flat)
    for indices, batch in _batches(flat, run, False, "right"):
        logprobs = _supervised_logprobs(run.model, batch)
        supervised = batch.labels != IGNORE_INDEX  # same order as the logprobs
        for j, index in enumerate(indices):
            row_mask = supervised[j]
            start, end = _last_span(row_mask)
            before = int(row_mask[:start].sum())
            span = logprobs[j][before : before + (end - start)]
            span = span[: max(len(span) - n_end, 0)]
            sums[index], counts[index] = float(span.sum()), len(span)
    out: list[dict[str, list]] = [{"option_logprobs": [], "option_tokens": []} for _ in records]
    for index, owner in enumerate(owners):
        out[owner]["option_logprobs"].append(sums[index])
        out[owner]["option_tokens"].append(counts[index])
    return out


@torch.no_grad()
def conversation_nll(records: Sequence[dict], run: Pass) -> list[dict[str, float]]:
    """Per record ``{"nll": summed negative log-likelihood, "tokens": count}`` of every
    assistant token of the whole conversation."""
    out: list[dict[str, float]] = [{} for _ in records]
    for indices, batch in _batches(records, run, False, "right"):
        for j, values in enumerate(_supervised_logprobs(run.model, batch)):
            out[indices[j]] = {"nll": -float(values.sum()), "tokens": int(values.numel())}
    return out
