"""Reward model: a scalar head on a language model trained on preference pairs with the Bradley–Terry loss.

L = −log σ(r(x, y_w) − r(x, y_l) − m) + c·(r(x, y_w) + r(x, y_l))²
(Ouyang et al. 2022 Eq. 1; the margin m of Touvron et al. 2023 §3.2.2 Eq. 2; the centring term c of Eisenstein
et al. 2023, as TRL's ``center_rewards_coefficient``). The score is read at the last real token of each sequence.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from transformers import PreTrainedModel

from datamodules.keys import (
    CHOSEN_ATTENTION_MASK,
    CHOSEN_INPUT_IDS,
    REJECTED_ATTENTION_MASK,
    REJECTED_INPUT_IDS,
)
from lit_align.base import AlignmentModule
from lit_align.losses import bradley_terry_loss
from lit_align.models import load_sequence_classifier, unwrap_peft

MARGIN = "margin"  # optional per-pair margin a DataModule may add to pair batches


class RewardModelModule(AlignmentModule):
    """Bradley–Terry reward model (data mode ``pair``) on ``AutoModelForSequenceClassification`` (1 label).

    Args:
        center_rewards_coefficient: c ≥ 0 of the centring term that keeps scores near zero (0 disables it; a
            negative c would reward scores for drifting apart from zero, so it is refused at construction).
        use_margin: subtract the batch's per-pair ``margin`` inside the sigmoid (Llama-2), when present.
        **kwargs: see :class:`~lit_align.base.AlignmentModule` (its optimizer settings are checked there).
    """

    paper: ClassVar[str] = (
        "Bradley-Terry reward model: Ouyang et al. 2022 (Eq. 1); margin: Touvron et al. 2023 (Llama 2)."
    )

    data_mode: ClassVar[str] = "pair"
    uses_reference: ClassVar[bool] = False
    lora_task_type: ClassVar[str] = "SEQ_CLS"
    metric_names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")

    def __init__(self, center_rewards_coefficient: float = 0.0, use_margin: bool = True, **kwargs) -> None:
        if not center_rewards_coefficient >= 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        super().__init__(**kwargs)

    def build_policy(self) -> PreTrainedModel:
        model = load_sequence_classifier(self.hparams.model, self.hparams.dtype, self.hparams.seed)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return last_token_scores(self.policy, input_ids, attention_mask)

    def shared_step(self, batch: dict, stage: str) -> Tensor:
        input_ids = torch.cat([batch[CHOSEN_INPUT_IDS], batch[REJECTED_INPUT_IDS]])
        attention_mask = torch.cat([batch[CHOSEN_ATTENTION_MASK], batch[REJECTED_ATTENTION_MASK]])
        chosen, rejected = self.scores(input_ids, attention_mask).chunk(2)
        margin = batch.get(MARGIN) if self.hparams.use_margin else None
        losses = bradley_terry_loss(chosen, rejected, margin, self.hparams.center_rewards_coefficient)
        self.log_values(
            stage,
            {
                "loss": losses,
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected,
                "rewards/accuracies": (chosen > rejected).float(),
            },
            batch_size=chosen.shape[0],
        )
        return losses.mean()


def last_token_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar scores of a sequence classifier read at the last attended token of each right-padded row.

    The classifier's own pooling looks for the last token that is not the pad id; our sequences end in EOS,
    which is also the pad token for many tokenizers, so the position is taken from the attention mask instead.
    """
    model = unwrap_peft(model)
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(-1).long() - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(pooled).squeeze(-1).float()
