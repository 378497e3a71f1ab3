"""Evaluation entry point: ``mmfuse-eval ckpt=<model dir> task=<name> [overrides]``.

Built-in tasks are ``conf/eval/task/*.yaml``; ``task=[a,b]``, ``ckpt=[x,y]`` and
``ablate=[none,image,audio,all]`` combine; ``data.path=<jsonl>`` points the (one) task at a
conversation JSONL (the default task, ``world``, scores exact match per sub-task);
``predictions=<jsonl> task=<name>`` re-scores a predictions file without a model. See
``mmfuse.evaluation`` and ``conf/eval.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from mmfuse.allocator import keep_freed_memory
from mmfuse.config import CONFIG_DIR
from mmfuse.evaluation.runner import evaluate
from mmfuse.metrics.exact_match import ExactMatchByTask, exact_match

__all__ = ["evaluate", "main", "score"]


def score(rows: Sequence[dict]) -> dict:
    """Exact match per task: ``{"overall", "tasks", "n"}``; adds ``score`` to each row."""
    scores = ExactMatchByTask()
    for row in rows:
        row["score"] = exact_match(row["prediction"], row["reference"])
    scores.update(
        [r["task"] for r in rows], [r["prediction"] for r in rows], [r["reference"] for r in rows]
    )
    return scores.compute()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper around :func:`evaluate`."""
    keep_freed_memory()
    evaluate(cfg)


if __name__ == "__main__":
    main()
