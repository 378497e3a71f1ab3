"""The LightningModule: loss, optimiser groups, schedule and validation metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from mmfuse.freezing import check_trainable, format_table
from mmfuse.generation import GenerationConfig, generate
from mmfuse.loss import check_weighting, global_token_mean, next_token_loss
from mmfuse.metrics.exact_match import ExactMatchByTask
from mmfuse.model import MMFuseModel
from mmfuse.optim import param_groups
from mmfuse.types import Batch


class MMFuseLitModule(LightningModule):
    """Trains an ``MMFuseModel`` on conversation batches.

    Validation has up to two loaders: 0 gives ``val/loss`` (teacher forcing), 1 (optional)
    generates answers with ``generation`` settings and gives ``val/exact_match`` overall and
    ``val/exact_match/<task>`` per task, gathered over all ranks.

    Args:
        model: the model to train.
        optimizer: partial optimiser, called with parameter groups.
        scheduler: partial schedule, called with the optimiser and ``total_steps``; or None.
        weight_decay: decay for weights; biases, norms and embeddings get none.
        lr_scale: ``{parameter-name prefix: multiplier of the optimiser's lr}``, e.g.
            ``{"encoders.image": 3.0}``; the optimiser partial must set ``lr``.
        generation: decoding settings for validation generation.
        frozen: the components configured frozen (``freezing.apply_freezing``); checked at
            fit start with the others, which must each have a trainable parameter.
        loss_weighting: how the training loss weighs the tokens of long and short answers
            (``next_token_loss``: ``token``, ``sample`` or ``square``); validation reports
            the plain token mean.
    """

    def __init__(
        self,
        model: MMFuseModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        weight_decay: float = 0.01,
        lr_scale: dict[str, float] | None = None,
        generation: GenerationConfig | None = None,
        frozen: Sequence[str] = (),
        loss_weighting: str = "token",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "generation"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = weight_decay
        self.lr_scale = dict(lr_scale or {})
        self.generation = generation or GenerationConfig()
        self._val_scores = ExactMatchByTask()
        self.frozen = list(frozen)
        self.loss_weighting = check_weighting(loss_weighting)  # fails here, not at step 1

    def on_fit_start(self) -> None:
        """Checks what trains (see ``freezing.check_trainable``), then prints the parameter
        table and logs it as hyper-parameters ``parameters/<component>/{total,trainable}``."""
        rows = check_trainable(self.model, self.frozen)
        rank_zero_info("parameters per component:\n" + format_table(rows))
        counts = {
            f"parameters/{row.component}/{kind}": getattr(row, kind)
            for row in rows
            for kind in ("total", "trainable")
        }
        for logger in self.loggers:
            logger.log_hyperparams(counts)

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int):
        return batch.to(device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if len(batch) == 0:  # every record was bad (data.on_bad_record=skip): no update
            return None
        logits, labels = self.model(batch)
        # every record was checked for a supervised token by the processor: no host read here
        loss, count = next_token_loss(
            logits, labels, batch.ids, check_supervised=False, weighting=self.loss_weighting
        )
        # with several ranks: the global batch's token mean (see global_token_mean)
        world = self.trainer.world_size if self._trainer is not None else 1
        loss, mean = global_token_mean(loss, count, world, self._sum_over_ranks)
        if self._is_logging_step():  # the progress bar reads its metrics back every step
            self.log("train/loss", mean, prog_bar=True, batch_size=len(batch))
        return loss

    def _is_logging_step(self) -> bool:
        """Whether to log the training loss this step: when Lightning's loggers write (every
        ``log_every_n_steps``), on the last batch of an epoch and on the last step (so the
        final metrics hold it), and always without a trainer. It is read back from the
        device only on those steps."""
        if self._trainer is None:
            return True
        trainer = self.trainer
        step = trainer.global_step + 1
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        on_interval = step % max(trainer.log_every_n_steps, 1) == 0
        return on_interval or last_step or bool(trainer.is_last_batch)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            logits, labels = self.model(batch)
            loss, _ = next_token_loss(logits, labels, batch.ids)
            self.log(
                "val/loss",
                loss,
                prog_bar=True,
                batch_size=len(batch),
                sync_dist=True,
                add_dataloader_idx=False,
            )
            return
        tokens = generate(self.model, batch, self.generation)
        predictions = self.model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        self._val_scores.update(batch.tasks, predictions, batch.references)

    def on_validation_epoch_end(self) -> None:
        scores = self._val_scores
        self._val_scores = ExactMatchByTask()
        if not scores.counts and not self._has_generation_loader():
            return
        tasks = sorted(set(scores.counts) | set(self._all_tasks(scores)))
        hits = torch.tensor([scores.hits.get(t, 0.0) for t in tasks], device=self.device)
        counts = torch.tensor([float(scores.counts.get(t, 0)) for t in tasks], device=self.device)
        hits, counts = self._sum_over_ranks(hits), self._sum_over_ranks(counts)
        total = counts.sum().clamp(min=1)
        self.log("val/exact_match", hits.sum() / total, prog_bar=True, add_dataloader_idx=False)
        for task, hit, count in zip(tasks, hits, counts, strict=False):
            self.log(f"val/exact_match/{task}", hit / count.clamp(min=1), add_dataloader_idx=False)

    def _has_generation_loader(self) -> bool:
        loaders = self.trainer.val_dataloaders if self._trainer is not None else None
        return isinstance(loaders, (list, tuple)) and len(loaders) > 1

    def _all_tasks(self, scores: ExactMatchByTask) -> list[str]:
        """Task names known on any rank (ranks may see different tasks)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return list(scores.counts)
        gathered: list[list[str]] = [[] for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(gathered, list(scores.counts))
        return [task for rank_tasks in gathered for task in rank_tasks]

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        return self.trainer.strategy.reduce(values, reduce_op="sum")

    def configure_optimizers(self) -> dict:
        lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        groups = param_groups(self.model, self.weight_decay, self.lr_scale, lr)
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
