"""Alignment losses as pure functions of log-probabilities (torch only, no Lightning).

* :mod:`~lit_align.losses.preference`: sequence-level losses, one unreduced loss per example — the DPO family
  (sigmoid / IPO / hinge / robust / SimPO) with its registry and :func:`preference_loss` dispatcher, KTO and the
  Bradley–Terry reward-model loss.
* :mod:`~lit_align.losses.policy_gradient`: token-level losses — KL estimators, PPO's clipped policy and value
  losses, and the distributional policy gradient.
* :mod:`~lit_align.losses.masked`: masked mean, mean/variance and whitening over token positions.

The effective margin coefficients of the pairwise losses (``margin_coefficients``, ``kto_margin_coefficients``)
live in :mod:`lit_align.gradients`, with the rest of the gradient-entanglement analysis.
"""

from lit_align.losses.masked import SumAcrossRanks, masked_mean, masked_mean_var, masked_whiten
from lit_align.losses.policy_gradient import (
    ClippedLossOutput,
    clipped_policy_loss,
    clipped_value_loss,
    dpg_loss,
    kl_penalty,
)
from lit_align.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    KTOOutput,
    LossOutput,
    bradley_terry_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    preference_loss,
    robust_loss,
    simpo_loss,
)

__all__ = [
    # preference (sequence-level)
    "LossOutput",
    "KTOOutput",
    "dpo_sigmoid_loss",
    "ipo_loss",
    "hinge_loss",
    "robust_loss",
    "simpo_loss",
    "kto_loss",
    "kto_kl_estimate",
    "bradley_terry_loss",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "preference_loss",
    # policy gradient (token-level)
    "ClippedLossOutput",
    "kl_penalty",
    "clipped_policy_loss",
    "clipped_value_loss",
    "dpg_loss",
    # masked reductions
    "SumAcrossRanks",
    "masked_mean",
    "masked_mean_var",
    "masked_whiten",
]
