"""``TaskScore``: a task metric at every validation, so a run's trace shows the alignment tax on a task (few-shot
SST-2 accuracy, few-shot Multi30k BLEU, held-out perplexity, an lm-eval task: ``lit_align.tasks``) next to its
reward and KL.

Each rank computes the task's statistics on its share of the examples with the policy and they are summed over
ranks before the score is taken, so the logged ``eval_tax/<task name>`` is exact under DDP / FSDP (one collective
per task and validation). Works with any ``lit_align.AlignmentModule``; during the sanity check it gives the
starting point. A task that scored nothing (a skipped lm-eval task) logs nothing.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from callbacks.base import AlignmentCallback
from lit_align.tasks import Task


class TaskScore(AlignmentCallback):
    """Log ``eval_tax/<name>`` of every task at the end of every validation.

    Args:
        tasks: ``lit_align.tasks.Task`` objects, e.g.
            ``[{class_path: lit_align.tasks.FewShotSST2, init_args: {shots: 4}}]``.
    """

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("TaskScore: give at least one task (e.g. lit_align.tasks.FewShotSST2())")
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"TaskScore: task names must differ, got {names}")
        self.tasks = list(tasks)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.policy.training
        pl_module.policy.eval()
        for task in self.tasks:
            statistics = task.statistics(pl_module.policy, pl_module.tokenizer, trainer.global_rank, trainer.world_size)
            local = torch.tensor(statistics, dtype=torch.float64, device=pl_module.device)
            value = task.value(pl_module.sum_across_ranks(local).tolist())
            if math.isfinite(value):
                pl_module.log(f"eval_tax/{task.name}", value, on_epoch=True, sync_dist=False)
        pl_module.policy.train(was_training)
