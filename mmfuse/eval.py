"""Evaluation entry point: ``mmfuse-eval ckpt=<model dir> data.path=<jsonl> output_dir=<dir>``.

Every record is answered by batched greedy generation (the last assistant turn is the
reference); predictions, per-task exact match and a printed table come out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from data_modules.conversation import ConversationDataset
from mmfuse.config import CONFIG_DIR
from mmfuse.generation import GenerationConfig, generate
from mmfuse.metrics.exact_match import ExactMatchByTask, exact_match
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import load_model_dir
from mmfuse.processing.collate import Collator
from mmfuse.processing.processor import Processor
from mmfuse.types import MODALITIES


def predict(
    model: MMFuseModel,
    processor: Processor,
    data_path: str | Path,
    generation: GenerationConfig,
    batch_size: int = 64,
    num_workers: int = 0,
    drop_modalities: Sequence[str] = (),
) -> list[dict]:
    """Generates an answer for every record of ``data_path``.

    Records are batched by task and length (similar answer lengths finish together) and
    returned in file order as ``{"id", "task", "prediction", "reference"}`` rows.
    """
    unknown = set(drop_modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"drop_modalities: unknown {sorted(unknown)}; choose from {MODALITIES}")
    dataset = ConversationDataset(data_path, processor, True, drop_modalities)
    order = sorted(
        range(len(dataset)),
        key=lambda i: (
            str(dataset.records[i].get("task", "")),
            len(json.dumps(dataset.records[i])),
        ),
    )
    loader = DataLoader(
        torch.utils.data.Subset(dataset, order),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=Collator(processor.tokenizer.pad_token_id, "left", processor.image.size),
    )
    device = next(model.parameters()).device
    rows: list[dict] = []
    for batch in loader:
        tokens = generate(model, batch.to(device), generation)
        texts = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for record_id, task, text, reference in zip(
            batch.ids, batch.tasks, texts, batch.references, strict=False
        ):
            rows.append({"id": record_id, "task": task, "prediction": text, "reference": reference})
    position = {index: rank for rank, index in enumerate(order)}
    return [rows[position[i]] for i in range(len(dataset))]


def score(rows: Sequence[dict]) -> dict:
    """Exact match per task: ``{"overall", "tasks", "n"}``; adds ``score`` to each row."""
    scores = ExactMatchByTask()
    for row in rows:
        row["score"] = exact_match(row["prediction"], row["reference"])
    scores.update(
        [r["task"] for r in rows], [r["prediction"] for r in rows], [r["reference"] for r in rows]
    )
    return scores.compute()


def format_table(metrics: dict, title: str = "") -> str:
    """A plain-text table of per-task accuracy."""
    lines = [title] if title else []
    lines.append(f"{'task':<16} {'n':>6} {'exact match':>12}")
    for task, value in metrics["tasks"].items():
        lines.append(f"{task:<16} {metrics['n'][task]:>6} {value:>12.3f}")
    lines.append(f"{'overall':<16} {sum(metrics['n'].values()):>6} {metrics['overall']:>12.3f}")
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict:
    """Runs the evaluation described by ``cfg`` and writes its outputs."""
    torch.manual_seed(cfg.seed)
    model, processor = load_model_dir(cfg.ckpt, cfg.device)
    rows = predict(
        model,
        processor,
        cfg.data.path,
        instantiate(cfg.generation),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        drop_modalities=list(cfg.drop_modalities),
    )
    metrics = score(rows)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    dropped = ", ".join(cfg.drop_modalities) or "none"
    print(format_table(metrics, f"{cfg.data.path} (media dropped: {dropped})"))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper around :func:`evaluate`."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
