"""Supervised fine-tuning: next-token negative log-likelihood (Radford et al. 2018; Ouyang et al. 2022 §3.5).

The loss is the mean NLL over the tokens the completion mask marks (completion-only, TRL's default for
prompt/completion data) or over every real token of the text (``completion_only_loss=False``). Under DDP/FSDP the
mean is over the tokens of every rank's batch, as in one process on the global batch.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from datamodules.keys import ATTENTION_MASK, COMPLETION_MASK, INPUT_IDS
from lit_align.base import AlignmentModule
from lit_align.logprobs import token_logprobs
from lit_align.metrics import Perplexity


class SFTModule(AlignmentModule):
    """SFT (data mode ``text``); logs ``loss``, ``mean_token_accuracy`` and ``perplexity`` (token-weighted).

    Args:
        completion_only_loss: train on completion tokens only (True) or on the whole text (False).
        **kwargs: see :class:`~lit_align.base.AlignmentModule`.
    """

    paper: ClassVar[str] = (
        "Supervised fine-tuning as in Ouyang et al. 2022, *Training language models to follow instructions "
        "with human feedback* (§3.5)."
    )

    data_mode: ClassVar[str] = "text"
    uses_reference: ClassVar[bool] = False
    metric_names = ("loss", "mean_token_accuracy")

    def __init__(self, completion_only_loss: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)

    def extra_metrics(self) -> dict:
        return {"perplexity": Perplexity}

    def shared_step(self, batch: dict, stage: str) -> Tensor:
        input_ids, attention_mask = batch[INPUT_IDS], batch[ATTENTION_MASK]
        loss_mask = batch[COMPLETION_MASK] if self.hparams.completion_only_loss else attention_mask
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        token_logps = token_logprobs(logits[:, :-1], input_ids[:, 1:])
        mask = loss_mask[:, 1:].to(token_logps.dtype)
        tokens = mask.sum()
        negative_log_likelihood = -(token_logps * mask).sum()
        loss = negative_log_likelihood / tokens.clamp_min(1)
        # training: the mean over every rank's tokens (validation metrics are token-weighted sums anyway)
        objective = negative_log_likelihood / self.per_rank_share(tokens).clamp_min(1) if stage == "train" else loss
        correct = (logits[:, :-1].argmax(-1) == input_ids[:, 1:]).to(mask.dtype) * mask
        self.log_values(
            stage,
            {
                "loss": (loss, tokens),
                "mean_token_accuracy": (correct.sum() / tokens.clamp_min(1), tokens),
            },
            batch_size=input_ids.shape[0],
        )
        perplexity = self.metrics.get(stage, "perplexity")
        perplexity.update(token_logps, mask)
        self.log(self.metrics.log_name(stage, "perplexity"), perplexity, on_step=False, on_epoch=True)
        return objective
