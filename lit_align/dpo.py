"""Direct Preference Optimization and its variants (Rafailov et al., NeurIPS 2023).

One step, top to bottom:
  1. chosen and rejected sequences go through the policy in one concatenated forward;
  2. the reference log-probs come from the frozen reference (or LoRA adapters off), or from a table precomputed
     once before training (``precompute_ref_logps``: the reference is then released);
  3. the loss variant (``loss_type``) turns log-ratios into per-example losses and implicit rewards
     r = β·(log π − log π_ref)  (DPO Eq. 5);
  4. metrics under TRL's names: ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``;
  5. optionally (``normalize_pair_gradients``) the step follows the pairwise-normalised direction
     ``g_w/‖g_w‖ − g_l/‖g_l‖`` instead of the loss gradient (``lit_align.gradients.normalized_pair_objective``).
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.keys import (
    CHOSEN_ATTENTION_MASK,
    CHOSEN_COMPLETION_MASK,
    CHOSEN_INPUT_IDS,
    INDEX,
    REJECTED_ATTENTION_MASK,
    REJECTED_COMPLETION_MASK,
    REJECTED_INPUT_IDS,
)
from lit_align.base import AlignmentModule
from lit_align.gradients import margin_coefficients, margin_loss_slope, normalized_pair_objective
from lit_align.logprobs import SequenceLogps
from lit_align.losses import REFERENCE_FREE_LOSSES, preference_loss
from lit_align.losses.preference import check_preference_arguments

PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


class DPOModule(AlignmentModule):
    r"""DPO with the loss variants of ``lit_align.losses`` (data mode ``pair``).

    Args:
        beta: inverse temperature β of the implicit reward (SimPO: its reward scale).
        loss_type: ``sigmoid`` (DPO/cDPO), ``ipo``, ``hinge``, ``robust``, ``simpo`` (reference-free).
        label_smoothing: ε, the assumed rate of flipped labels (cDPO for ``sigmoid``; robust DPO for ``robust``).
        simpo_gamma: SimPO's target reward margin γ.
        precompute_ref_logps: compute reference log-probs for every train/val pair in one pass before training,
            reuse them every epoch and drop the reference model from memory.
        precompute_batch_size: batch size of that pass (default: the DataModule's).
        normalize_pair_gradients: step along ``−s·(g_w/‖g_w‖ − g_l/‖g_l‖)`` (s = the loss derivative), which raises
            the chosen and lowers the rejected log-prob of every pair to first order (Yuan et al. 2024, the
            gradient-entanglement mitigation). Costs one extra backward per sequence per step.
        normalization_parameters: regex on parameter names restricting the per-sequence norms ‖g‖ (e.g.
            ``layers\.2[6-9]\.`` for the last four blocks, or ``lora_``); ``None`` = every trainable parameter.
        **kwargs: see :class:`~lit_align.base.AlignmentModule` (model, lora, learning_rate, ...).

    Raises:
        ValueError: at construction, before any model loads, for an argument combination that could never train:
            an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` with a loss that does not take it or
            outside ``[0, 0.5)`` (``losses.preference.check_preference_arguments``), a bad
            ``normalization_parameters`` pattern (or one without ``normalize_pair_gradients``), ``precompute_batch_size
            < 1``, a non-finite ``simpo_gamma`` (or a non-default one with a loss other than ``simpo``), or a bad
            optimizer setting (see :class:`~lit_align.base.AlignmentModule`).
    """

    paper: ClassVar[str] = (
        "Rafailov et al. 2023, *Direct Preference Optimization* (Eq. 7), and the variant named by loss_type "
        "(IPO: Azar et al. 2023; SLiC-HF hinge: Zhao et al. 2023; robust: Chowdhury et al. 2024; SimPO: Meng "
        "et al. 2024)."
    )

    data_mode: ClassVar[str] = "pair"
    metric_names = PAIR_METRICS
    progress_bar_metrics = ("loss", "rewards/accuracies", "rewards/margins")

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        precompute_ref_logps: bool = False,
        precompute_batch_size: int | None = None,
        normalize_pair_gradients: bool = False,
        normalization_parameters: str | None = None,
        **kwargs,
    ) -> None:
        check_preference_arguments(loss_type, beta=beta, label_smoothing=label_smoothing)
        if precompute_batch_size is not None and precompute_batch_size < 1:
            raise ValueError(f"precompute_batch_size must be >= 1 (or None), got {precompute_batch_size}")
        if not math.isfinite(simpo_gamma):
            raise ValueError(f"simpo_gamma (SimPO's target margin γ) must be a finite number, got {simpo_gamma}")
        if simpo_gamma != 0.5 and loss_type != "simpo":  # a non-default margin would be ignored silently
            raise ValueError(f"simpo_gamma={simpo_gamma} is used by loss_type 'simpo' only, not {loss_type!r}")
        if normalization_parameters is not None:
            if not normalize_pair_gradients:
                raise ValueError(
                    f"normalization_parameters={normalization_parameters!r} is used only with "
                    "normalize_pair_gradients=True"
                )
            re.compile(normalization_parameters)  # a bad pattern fails here, not at the first step
        super().__init__(**kwargs)
        self.uses_reference = loss_type not in REFERENCE_FREE_LOSSES
        self.reference_table: dict[str, Tensor] = {}

    # ---- the step -------------------------------------------------------------------------------------------

    def forward_pair(self, batch: dict) -> tuple[SequenceLogps, SequenceLogps]:
        """Policy log-probs of chosen and rejected from one concatenated forward."""
        logps = self.policy_logprobs(*_concatenated(batch))
        chosen, rejected = (SequenceLogps(*parts) for parts in zip(*(t.chunk(2) for t in logps), strict=True))
        return chosen, rejected

    def reference_pair(self, batch: dict, stage: str) -> tuple[Tensor, Tensor] | tuple[None, None]:
        if not self.uses_reference:
            return None, None
        table = self.reference_table.get(_split_of(stage))
        if table is not None:
            rows = table[batch[INDEX]]
            return rows[:, 0], rows[:, 1]
        logps = self.reference_logprobs(*_concatenated(batch)).logps
        return logps.chunk(2)

    def loss_arguments(
        self, chosen: SequenceLogps, rejected: SequenceLogps, ref_chosen: Tensor, ref_rejected: Tensor
    ) -> dict:
        """Keyword arguments of ``preference_loss`` and of ``margin_loss_slope`` (the same loss) for a pair batch."""
        return dict(
            policy_chosen_logps=chosen.logps,
            policy_rejected_logps=rejected.logps,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            chosen_lengths=chosen.tokens,
            rejected_lengths=rejected.tokens,
            beta=self.hparams.beta,
            label_smoothing=self.hparams.label_smoothing,
            gamma=self.hparams.simpo_gamma,
        )

    def shared_step(self, batch: dict, stage: str) -> Tensor:
        chosen, rejected = self.forward_pair(batch)
        ref_chosen, ref_rejected = self.reference_pair(batch, stage)
        out = preference_loss(self.hparams.loss_type, **self.loss_arguments(chosen, rejected, ref_chosen, ref_rejected))
        losses = out.losses
        if self.hparams.normalize_pair_gradients and stage == "train":
            losses = normalized_pair_objective(
                losses, chosen.logps, rejected.logps, self.normalized_gradient_parameters()
            )
        loss = losses.mean()
        self.log_values(
            stage,
            {
                "loss": out.losses,
                "rewards/chosen": out.chosen_rewards,
                "rewards/rejected": out.rejected_rewards,
                "rewards/margins": out.chosen_rewards - out.rejected_rewards,
                "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
                "logps/chosen": chosen.logps,
                "logps/rejected": rejected.logps,
            },
            batch_size=chosen.logps.shape[0],
        )
        return loss

    def pair_margin_coefficients(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The loss's ``(c_w, c_l)`` on a pair batch (table and derivation: ``gradients.margin_coefficients``)."""
        return margin_coefficients(
            self.hparams.loss_type,
            beta=self.hparams.beta,
            chosen_lengths=batch[CHOSEN_COMPLETION_MASK].sum(-1).float(),
            rejected_lengths=batch[REJECTED_COMPLETION_MASK].sum(-1).float(),
        )

    @torch.no_grad()
    def pair_loss_slope(self, batch: dict, split: str = "val") -> Tensor:
        """−ℓ'(m) of each pair of a pair batch from ``split`` at the current weights: > 0 where the loss widens the
        margin, < 0 where it narrows it (IPO past 1/(2β), cDPO once σ(m) > 1−ε), 0 where flat (hinge past its
        margin) — ``gradients.margin_loss_slope``. The reference log-probs come as in training."""
        chosen, rejected = self.forward_pair(batch)
        ref_chosen, ref_rejected = self.reference_pair(batch, split)
        arguments = self.loss_arguments(chosen, rejected, ref_chosen, ref_rejected)
        return margin_loss_slope(self.hparams.loss_type, **arguments)

    def normalized_gradient_parameters(self) -> list[nn.Parameter]:
        """The parameters whose per-sequence gradient norms normalise the step (all trainable by default)."""
        return self.parameters_matching(self.hparams.normalization_parameters, "normalization_parameters")

    # ---- precomputed reference log-probs --------------------------------------------------------------------

    @property
    def reference_logps_precomputed(self) -> bool:
        return bool(self.hparams.precompute_ref_logps and self.uses_reference)

    def on_fit_start(self) -> None:
        if self.hparams.normalize_pair_gradients and any(isinstance(p, DTensor) for p in self.parameters()):
            raise NotImplementedError(
                "normalize_pair_gradients needs per-sequence gradients of unsharded parameters, which FSDP2 does "
                "not expose; use strategy=ddp (or LoRA adapters) for this option"
            )
        self._maybe_precompute(("train", "val"))

    def on_validation_start(self) -> None:
        self._maybe_precompute(("val",))

    def on_test_start(self) -> None:
        self._maybe_precompute(("val",))

    def _maybe_precompute(self, splits: tuple[str, ...]) -> None:
        if not (self.hparams.precompute_ref_logps and self.uses_reference):
            return
        missing = [s for s in splits if s not in self.reference_table and self._has_split(s)]
        for split in missing:
            self.reference_table[split] = self._precompute_split(split)
        if missing and not self.uses_lora and self.trainer.state.fn == "fit":
            self.reference = None  # the table replaces it for the rest of the run
            rank_zero_info("precomputed reference log-probs; released the reference model")

    def _has_split(self, split: str) -> bool:
        return self.trainer.datamodule is not None and self.trainer.datamodule.has_split(split)

    @torch.no_grad()
    def _precompute_split(self, split: str) -> Tensor:
        """One unshuffled pass over a split; every rank ends with the full [N, 2] table (chosen, rejected)."""
        datamodule = self.trainer.datamodule
        loader = datamodule.dataloader(split, shuffle=False, batch_size=self.hparams.precompute_batch_size)
        if self.trainer.world_size > 1:
            sampler = DistributedSampler(
                loader.dataset, shuffle=False, **self.trainer.strategy.distributed_sampler_kwargs
            )
            loader = DataLoader(
                loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn
            )
        table = torch.full((len(loader.dataset), 2), float("nan"), device=self.device)
        for batch in loader:
            batch = self.trainer.strategy.batch_to_device(batch)
            pair = torch.stack(self.reference_logprobs(*_concatenated(batch)).logps.float().chunk(2), dim=-1)
            index = batch[INDEX]
            if self.trainer.world_size > 1:
                pair = self.all_gather(pair).flatten(0, 1)
                index = self.all_gather(index).flatten()
            table[index] = pair
        if torch.isnan(table).any():
            raise RuntimeError(f"reference log-probs missing for some '{split}' rows after precomputation")
        return table


def _concatenated(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """[chosen; rejected] stacked on the batch axis (the DataModule pads both to one length)."""
    return (
        torch.cat([batch[CHOSEN_INPUT_IDS], batch[REJECTED_INPUT_IDS]]),
        torch.cat([batch[CHOSEN_ATTENTION_MASK], batch[REJECTED_ATTENTION_MASK]]),
        torch.cat([batch[CHOSEN_COMPLETION_MASK], batch[REJECTED_COMPLETION_MASK]]),
    )


def _split_of(stage: str) -> str:
    return "train" if stage == "train" else "val"
