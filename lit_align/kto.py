"""Kahneman–Tversky Optimization (Ethayarajh et al., ICML 2024) on unpaired desirable/undesirable examples.

One step, top to bottom:
  1. policy log-probs of each (prompt, completion) with gradient;
  2. the reference point z_ref (KTO Eq. 8): KL(π‖π_ref) estimated on *mismatched* pairs (prompt_i with the
     completion of row i−1, built by the DataModule), without gradient, summed over every rank, clamped at 0;
  3. desirable rows are pushed above z_ref, undesirable rows below it, weighted by λ_D / λ_U;
  4. metrics: ``kl``, ``rewards/{chosen,rejected,margins}``, ``logps/{chosen,rejected}`` (chosen = desirable).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from datamodules.keys import (
    ATTENTION_MASK,
    CHOSEN_ATTENTION_MASK,
    CHOSEN_COMPLETION_MASK,
    CHOSEN_INPUT_IDS,
    COMPLETION_MASK,
    INPUT_IDS,
    KL_ATTENTION_MASK,
    KL_COMPLETION_MASK,
    KL_INPUT_IDS,
    LABEL,
    REJECTED_ATTENTION_MASK,
    REJECTED_COMPLETION_MASK,
    REJECTED_INPUT_IDS,
)
from lit_align.base import AlignmentModule
from lit_align.gradients import kto_margin_coefficients
from lit_align.losses import kto_kl_estimate, kto_loss
from lit_align.losses.preference import check_kto_arguments
from lit_align.metrics import DifferenceOfMeans


class KTOModule(AlignmentModule):
    """KTO (data mode ``unpaired``): per-device batches need ≥ 2 rows to form mismatched KL pairs.

    Args:
        beta: β of the implicit reward (> 0).
        desirable_weight, undesirable_weight: λ_D and λ_U (> 0). The paper (Eq. 9) recommends
            λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]; a warning is given at fit start outside that range.
        **kwargs: see :class:`~lit_align.base.AlignmentModule`.

    Raises:
        ValueError: at construction (before any model loads) for ``beta <= 0`` or a weight ``<= 0``.
    """

    paper: ClassVar[str] = "Ethayarajh et al. 2024, *KTO: Model Alignment as Prospect Theoretic Optimization* (Eq. 8)."

    data_mode: ClassVar[str] = "unpaired"
    metric_names = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")

    def __init__(
        self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, **kwargs
    ) -> None:
        check_kto_arguments(beta, desirable_weight, undesirable_weight)
        super().__init__(**kwargs)
        self.last_reference_point = 0.0  # z_ref of the latest training batch (for diagnostics)

    def extra_metrics(self) -> dict:
        return {"rewards/margins": DifferenceOfMeans}

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        batch_size = getattr(datamodule, "batch_size", None)
        if batch_size is not None and batch_size < 2:
            raise ValueError(
                f"KTOModule needs a per-device batch size of at least 2 to build mismatched KL pairs; "
                f"the DataModule has batch_size={batch_size}"
            )

    def reference_point(self, batch: dict) -> Tensor:
        """z_ref = max(0, mean over all ranks of log π(y'|x) − log π_ref(y'|x)) on mismatched pairs
        (``losses.kto_kl_estimate`` with this module's cross-rank sum)."""
        kl_inputs = (batch[KL_INPUT_IDS], batch[KL_ATTENTION_MASK], batch[KL_COMPLETION_MASK])
        with torch.no_grad():
            policy_kl_logps = self.policy_logprobs(*kl_inputs).logps
            reference_kl_logps = self.reference_logprobs(*kl_inputs).logps
        return kto_kl_estimate(policy_kl_logps, reference_kl_logps, sum_across_ranks=self.sum_across_ranks)

    def shared_step(self, batch: dict, stage: str) -> Tensor:
        if batch[INPUT_IDS].shape[0] < 2:
            raise ValueError("KTOModule received a batch of 1 row: mismatched KL pairs need at least 2")
        inputs = (batch[INPUT_IDS], batch[ATTENTION_MASK], batch[COMPLETION_MASK])
        policy = self.policy_logprobs(*inputs)
        reference = self.reference_logprobs(*inputs)
        z_ref = self.reference_point(batch)
        if stage == "train":
            self.last_reference_point = float(z_ref)
        desirable = batch[LABEL].bool()
        out = kto_loss(
            policy.logps,
            reference.logps,
            desirable,
            z_ref,
            beta=self.hparams.beta,
            desirable_weight=self.hparams.desirable_weight,
            undesirable_weight=self.hparams.undesirable_weight,
        )
        self.log_values(
            stage,
            {
                "loss": out.losses,
                "kl": z_ref.reshape(1),
                "rewards/chosen": out.rewards[desirable],
                "rewards/rejected": out.rewards[~desirable],
                "logps/chosen": policy.logps[desirable],
                "logps/rejected": policy.logps[~desirable],
            },
            batch_size=desirable.shape[0],
        )
        margins = self.metrics.get(stage, "rewards/margins")
        margins.update(out.rewards[desirable], out.rewards[~desirable])
        self.log(self.metrics.log_name(stage, "rewards/margins"), margins, on_step=False, on_epoch=True)
        return out.losses.mean()

    @torch.no_grad()
    def pair_margin_coefficients(self, batch: dict) -> tuple[Tensor, Tensor]:
        """KTO's ``(c_w, c_l)`` on a pair batch at the latest z_ref (``gradients.kto_margin_coefficients``)."""
        ratios = []
        for side in (
            (CHOSEN_INPUT_IDS, CHOSEN_ATTENTION_MASK, CHOSEN_COMPLETION_MASK),
            (REJECTED_INPUT_IDS, REJECTED_ATTENTION_MASK, REJECTED_COMPLETION_MASK),
        ):
            inputs = [batch[key] for key in side]
            ratios.append(self.policy_logprobs(*inputs).logps - self.reference_logprobs(*inputs).logps)
        return kto_margin_coefficients(
            *ratios,
            self.last_reference_point,
            beta=self.hparams.beta,
            desirable_weight=self.hparams.desirable_weight,
            undesirable_weight=self.hparams.undesirable_weight,
        )

    def pair_loss_slope(self, batch: dict, split: str = "val") -> Tensor:
        """KTO's ``pair_margin_coefficients`` already are the loss's derivatives, both > 0: slope 1 for every pair
        (``gradients.kto_margin_coefficients``)."""
        return torch.ones(batch[CHOSEN_INPUT_IDS].shape[0], device=batch[CHOSEN_INPUT_IDS].device)

    def on_train_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not datamodule.has_split("train"):
            return
        labels = torch.tensor([bool(record[LABEL]) for record in datamodule.dataset("train").records])
        n_d, n_u = int(labels.sum()), int((~labels).sum())
        if n_u == 0 or n_d == 0:
            rank_zero_warn(f"KTO training data has {n_d} desirable and {n_u} undesirable rows")
            return
        ratio = self.hparams.desirable_weight * n_d / (self.hparams.undesirable_weight * n_u)
        if not 1.0 <= ratio <= 4 / 3:
            rank_zero_warn(
                f"λ_D·n_D/(λ_U·n_U) = {ratio:.2f} is outside [1, 4/3] recommended by the KTO paper (Eq. 9): "
                f"n_D={n_d}, n_U={n_u}; adjust desirable_weight/undesirable_weight"
            )
