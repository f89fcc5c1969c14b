"""``TaskScore``: a task metric at every validation, so a run's trace shows the alignment tax on a task (e.g.
few-shot SST-2 accuracy, ``lit_align.tasks.FewShotSST2``) next to its reward and KL.

Each rank scores its share of the task's examples with the policy and the counts are summed over ranks, so the
logged ``eval_tax/<task name>`` is exact under DDP / FSDP (one collective per validation). Works with any
``lit_align.AlignmentModule``; during the sanity check it gives the starting point.
"""

from __future__ import annotations

import lightning as L
import torch

from callbacks.base import AlignmentCallback


class TaskScore(AlignmentCallback):
    """Log ``eval_tax/<name>`` (accuracy in [0, 1]) of every task at the end of every validation.

    Args:
        tasks: task objects with ``name`` and ``score(model, tokenizer, rank, world_size) -> (correct, total)``
            (``lit_align.tasks``), e.g. ``[{class_path: lit_align.tasks.FewShotSST2, init_args: {shots: 4}}]``.
    """

    def __init__(self, tasks: list) -> None:
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
            correct, total = task.score(pl_module.policy, pl_module.tokenizer, trainer.global_rank, trainer.world_size)
            counts = pl_module.sum_across_ranks(torch.tensor([float(correct), float(total)], device=pl_module.device))
            pl_module.log(f"eval_tax/{task.name}", counts[0] / counts[1].clamp_min(1), on_epoch=True, sync_dist=False)
        pl_module.policy.train(was_training)
