"""Sequence-level alignment losses as pure functions of log-probabilities (torch only, no Lightning).

Conventions shared by every function here:

* Log-probabilities are **sequence-summed** over the completion tokens,
  ``log π(y|x) = Σ_t log π(y_t|x, y_<t)``, one value per example, shape ``[B]``. The caller does the
  token masking (see :func:`~lit_align.losses.masked.masked_mean` for the token-level helper).
* Losses are returned **per example** (shape ``[B]``, not reduced) so the caller decides how to reduce
  (mean, weighted mean, gathered mean under DDP, ...).
* Implicit rewards are returned **detached**: they are for logging / accuracy metrics only.
* Everything is computed in the dtype of the inputs; sigmoids go through ``logsigmoid`` /
  ``sigmoid`` so nothing overflows for large ``|β·Δ|``.

Notation (as in TRL, see ``trl/trainer/dpo_trainer.py``): ``π`` = policy log-prob, ``ref`` = reference
log-prob, ``c``/``r`` = chosen/rejected, ``Δ = (π_c − ref_c) − (π_r − ref_r)``, ``ε`` = label smoothing.

Which variant of each loss we implement is stated explicitly in each docstring, because TRL has changed them
over time (e.g. its ``"sigmoid"`` loss dropped cDPO label smoothing after v0.12; ours keeps it, with
``label_smoothing=0.0`` as the default giving plain DPO).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_align.losses.masked import SumAcrossRanks

__all__ = [
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
    "LABEL_SMOOTHING_LOSSES",
    "preference_loss",
    "check_preference_arguments",
    "check_kto_arguments",
]


class LossOutput(NamedTuple):
    """Result of a pairwise preference loss.

    Attributes:
        losses: per-example losses, shape ``[B]`` (not reduced; carries the gradient).
        chosen_rewards: detached implicit rewards of the chosen completions, shape ``[B]``.
        rejected_rewards: detached implicit rewards of the rejected completions, shape ``[B]``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class KTOOutput(NamedTuple):
    """Result of :func:`kto_loss`.

    Attributes:
        losses: per-example losses, already multiplied by the desirable / undesirable weight, shape ``[B]``.
        rewards: detached implicit rewards ``β·(π − ref)``, shape ``[B]``.
    """

    losses: Tensor
    rewards: Tensor


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1.0], got {label_smoothing}")


def _as_lengths(lengths: Tensor | int | float, like: Tensor) -> Tensor:
    """Lengths as a tensor in ``like``'s dtype/device, clamped to >= 1 (no division by 0)."""
    return torch.as_tensor(lengths, dtype=like.dtype, device=like.device).clamp_min(1)


def _smoothed_logsigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """``−(1−ε)·logσ(x) − ε·logσ(−x)`` (binary cross-entropy against the soft label ``1−ε``)."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def _reference_rewards(
    beta: float,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return chosen.detach(), rejected.detach()


# ----------------------------------------------------------------------------------------------------------
# pairwise preference losses
# ----------------------------------------------------------------------------------------------------------


def dpo_sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7) with cDPO label smoothing.

    ``L = −(1−ε)·logσ(β·Δ) − ε·logσ(−β·Δ)``, ``Δ = (π_c − ref_c) − (π_r − ref_r)``.

    With ``ε = 0`` this is exactly Eq. 7, ``−logσ(β·Δ)``. ``ε > 0`` is conservative DPO (cDPO; Mitchell 2023,
    "A note on DPO with noisy preferences"), which assumes each label is flipped with probability ``ε``; this
    is the behaviour of TRL's ``"sigmoid"`` loss up to v0.12 (current TRL has no smoothing in ``"sigmoid"``).

    Args:
        policy_chosen_logps / policy_rejected_logps: sequence-summed policy log-probs, ``[B]``.
        ref_chosen_logps / ref_rejected_logps: sequence-summed reference log-probs, ``[B]`` (no grad needed).
        beta: inverse temperature ``β`` (strength of the implicit KL regulariser), > 0.
        label_smoothing: ``ε`` in ``[0, 1]`` (meaningful range ``[0, 0.5]``).

    Returns:
        :class:`LossOutput` with rewards ``β·(π − ref)`` per side (detached).
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing)
    delta = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = _smoothed_logsigmoid_loss(beta * delta, label_smoothing)
    chosen_rewards, rejected_rewards = _reference_rewards(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    chosen_lengths: Tensor | int | float = 1,
    rejected_lengths: Tensor | int | float = 1,
) -> LossOutput:
    """IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17), length-normalised as TRL does.

    ``L = (Δ_norm − 1/(2β))²``, ``Δ_norm = (π_c − ref_c)/|y_c| − (π_r − ref_r)/|y_r|``.

    Eq. 17 uses the summed log-ratio ``h``; TRL (and this function) average the log-ratios per token, which
    its source says was confirmed with the IPO authors. ``β`` plays the role of the paper's ``τ``.

    Args:
        policy_* / ref_*: sequence-summed log-probs, ``[B]``.
        beta: regularisation ``τ`` (> 0); the target log-ratio gap is ``1/(2β)``.
        chosen_lengths / rejected_lengths: number of completion tokens ``|y|`` per example (``[B]`` or a
            scalar); clamped to >= 1.

    Returns:
        :class:`LossOutput`. Rewards are ``β·(π − ref)`` on the **summed** (not length-normalised) log-ratios,
        the same quantity as for DPO, so dashboards are comparable across loss types.
    """
    _check_beta(beta)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta_norm = chosen_logratios / _as_lengths(chosen_lengths, chosen_logratios) - rejected_logratios / (
        _as_lengths(rejected_lengths, rejected_logratios)
    )
    losses = (delta_norm - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards, rejected_rewards = _reference_rewards(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """SLiC-style hinge loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", rank-calibration loss), applied to the reference log-ratios as in TRL's ``"hinge"``:
    ``L = relu(1 − β·Δ)``.

    ``1/β`` is the margin ``δ`` of SLiC. Rewards are ``β·(π − ref)`` per side (detached).
    """
    _check_beta(beta)
    delta = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = torch.relu(1.0 - beta * delta)
    chosen_rewards, rejected_rewards = _reference_rewards(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", the rDPO loss), as TRL's ``"robust"``:

    ``L = [−(1−ε)·logσ(β·Δ) + ε·logσ(−β·Δ)] / (1 − 2ε)``.

    Unlike cDPO this is an *unbiased* estimate of the clean-label DPO loss when labels are flipped with
    probability ``ε``; it reduces to DPO for ``ε = 0``. Requires ``0 <= ε < 0.5`` (``ε = 0.5`` divides by 0).
    Rewards are ``β·(π − ref)`` per side (detached).

    Raises:
        ValueError: if ``label_smoothing`` is not in ``[0, 0.5)``.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"robust loss needs label_smoothing (the label-noise rate ε) in [0, 0.5), got {label_smoothing}"
        )
    delta = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    logits = beta * delta
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1.0 - 2.0 * label_smoothing
    )
    chosen_rewards, rejected_rewards = _reference_rewards(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor | int | float,
    rejected_lengths: Tensor | int | float,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO loss (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    Eq. 6), reference-free and length-normalised:

    ``x = β·π_c/|y_c| − β·π_r/|y_r| − γ``,  ``L = −(1−ε)·logσ(x) − ε·logσ(−x)``.

    ``γ`` is the absolute target reward margin of Eq. 6 (the SimPO repo's configs specify it as
    ``gamma_beta_ratio = γ/β`` instead). ``ε`` is optional label smoothing as in :func:`dpo_sigmoid_loss`
    (``ε = 0`` gives Eq. 6 exactly).

    Args:
        policy_chosen_logps / policy_rejected_logps: sequence-summed policy log-probs, ``[B]``.
        chosen_lengths / rejected_lengths: completion token counts ``|y|`` (``[B]`` or scalar), clamped
            to >= 1.
        beta: reward scale ``β`` (> 0); gamma: target margin ``γ``; label_smoothing: ``ε`` in ``[0, 1]``.

    Returns:
        :class:`LossOutput` with rewards ``β·π/|y|`` per side (detached).
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing)
    chosen_rewards = beta * policy_chosen_logps / _as_lengths(chosen_lengths, policy_chosen_logps)
    rejected_rewards = beta * policy_rejected_logps / _as_lengths(rejected_lengths, policy_rejected_logps)
    losses = _smoothed_logsigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


# ----------------------------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------------------------


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8).

    With ``r = π − ref`` and the reference point ``z = z_ref`` (``kl``):

    * desirable examples:   ``λ_D·(1 − σ(β·(r − z)))``
    * undesirable examples: ``λ_U·(1 − σ(β·(z − r)))``

    (the constant ``λ_y`` of Eq. 8 is dropped, as in the paper's and TRL's implementation). ``1 − σ(x)`` is
    computed as ``σ(−x)``, which is stable for any ``x``.

    No gradient flows through ``z`` or the reference log-probs: both are **detached here** (z_ref is a fixed
    reference point of the value function, not something the policy may move — as TRL, which computes it under
    ``no_grad``). Estimating ``z`` — the mean over all ranks, clamped at 0 — is :func:`kto_kl_estimate`'s job.

    Args:
        policy_logps / ref_logps: sequence-summed log-probs of the (prompt, completion) examples, ``[B]``.
        desirable: bool tensor ``[B]``; True for desirable ("chosen") examples.
        kl: the reference point ``z_ref`` (scalar tensor or float).
        beta: ``β`` (> 0); desirable_weight / undesirable_weight: ``λ_D`` / ``λ_U`` (> 0).

    Returns:
        :class:`KTOOutput` ``(losses [B] already weighted, rewards [B] = β·r detached)``.
    """
    check_kto_arguments(beta, desirable_weight, undesirable_weight)
    desirable = torch.as_tensor(desirable, device=policy_logps.device).bool()
    logratios = policy_logps - ref_logps.detach()
    z = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach()
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - z))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z - logratios))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return KTOOutput(losses, (beta * logratios).detach())


def kto_kl_estimate(
    kl_policy_logps: Tensor, kl_ref_logps: Tensor, sum_across_ranks: SumAcrossRanks | None = None
) -> Tensor:
    """The KTO reference point ``z_ref = max(0, mean(π(y'|x) − ref(y'|x)))`` over mismatched pairs
    ``(x, y')`` (Ethayarajh et al. 2024, Sec. 4.1; TRL ``kto_trainer.py``), detached.

    **Under DDP the mean must be over all ranks**, not per device, so every rank uses the same ``z_ref``: pass
    ``sum_across_ranks`` (e.g. ``AlignmentModule.sum_across_ranks``, which ``KTOModule`` passes); it receives the
    local ``[Σ log-ratio, count]`` and must return the sums over every rank (one collective). ``None`` = this
    process only. The mean is taken before the clamp (the mean of clamped per-rank values would be biased up).

    Returns:
        A detached 0-dim tensor ``>= 0``; ``0`` when there is no pair at all (rather than NaN).
    """
    diff = (kl_policy_logps - kl_ref_logps).detach()
    local = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=diff.dtype, device=diff.device)])
    total, count = local if sum_across_ranks is None else sum_across_ranks(local)
    return (total / count.clamp_min(1)).clamp_min(0)


# ----------------------------------------------------------------------------------------------------------
# reward model
# ----------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | None = None,
    center_coefficient: float = 0.0,
) -> Tensor:
    """Pairwise Bradley–Terry reward-model loss, per example.

    ``L = −logσ(s_c − s_r − m) + c·(s_c + s_r)²``

    * ``−logσ(s_c − s_r)``: Ouyang et al. 2022 ("InstructGPT"), Eq. 1 (without the 1/C(K,2) pair weighting).
    * ``m``: optional per-example margin, Touvron et al. 2023 ("Llama 2"), Eq. 2.
    * ``c·(s_c + s_r)²``: TRL ``RewardTrainer``'s ``center_rewards_coefficient`` (Eisenstein et al. 2023),
      which keeps scores centred on 0.

    Args:
        chosen_scores / rejected_scores: scalar reward-head outputs, shape ``[B]`` (squeeze a ``[B, 1]``
            head output first).
        margin: optional ``[B]`` (or scalar) margin; ``None`` means 0.
        center_coefficient: ``c >= 0``.

    Returns:
        Per-example losses ``[B]``.
    """
    logits = chosen_scores - rejected_scores
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


# ----------------------------------------------------------------------------------------------------------
# registry + dispatcher
# ----------------------------------------------------------------------------------------------------------

PREFERENCE_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "simpo": simpo_loss,
}
"""Pairwise preference losses by name (the names of TRL's ``loss_type`` where they exist)."""

REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"simpo"})
"""Losses that need no reference model (callers can skip loading / running one)."""

LABEL_SMOOTHING_LOSSES: frozenset[str] = frozenset({"sigmoid", "robust", "simpo"})
"""Losses that take ``label_smoothing`` (ε): cDPO for ``sigmoid`` / ``simpo``, robust DPO for ``robust``."""

_NEEDS_LENGTHS = frozenset({"ipo", "simpo"})


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(
            f"Unknown preference loss_type {loss_type!r}; valid names are: {', '.join(sorted(PREFERENCE_LOSSES))}"
        )


def _check_supports_label_smoothing(loss_type: str, label_smoothing: float) -> None:
    if label_smoothing and loss_type not in LABEL_SMOOTHING_LOSSES:
        raise ValueError(
            f"loss_type {loss_type!r} does not support label_smoothing (got {label_smoothing}); "
            f"losses that do: {', '.join(sorted(LABEL_SMOOTHING_LOSSES))}"
        )


def check_preference_arguments(loss_type: str, *, beta: float, label_smoothing: float = 0.0) -> None:
    """Refuse a preference-loss configuration that could never run (``DPOModule`` calls this at construction,
    before any model loads, so a bad combination does not fail only at the first step).

    Raises:
        ValueError: naming the argument and its value, for an unknown ``loss_type`` (the message lists
            :data:`PREFERENCE_LOSSES`), ``beta <= 0``, a non-zero ``label_smoothing`` with a loss outside
            :data:`LABEL_SMOOTHING_LOSSES`, or ``label_smoothing`` outside ``[0, 0.5)``: ε is the assumed rate of
            flipped labels, and at ε ≥ 0.5 the labels carry no (or reversed) preference — robust DPO divides
            by ``1 − 2ε``, and cDPO's optimum ``β·Δ = log((1−ε)/ε)`` is ``≤ 0``. (The loss functions themselves
            accept cDPO's ``ε ∈ [0, 1]`` for completeness.)
    """
    _check_loss_type(loss_type)
    _check_beta(beta)
    _check_supports_label_smoothing(loss_type, label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing (ε, the assumed rate of flipped preference labels) must be in [0, 0.5), "
            f"got {label_smoothing}"
        )


def check_kto_arguments(beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    """Refuse ``beta <= 0`` and non-positive ``desirable_weight`` / ``undesirable_weight`` (λ_D, λ_U of KTO
    Eq. 8, positive in the paper): ``KTOModule`` calls this at construction, :func:`kto_loss` on every call.

    Raises:
        ValueError: naming the argument and its value.
    """
    _check_beta(beta)
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not value > 0:
            raise ValueError(f"{name} (λ of KTO Eq. 8) must be > 0, got {value}")


def preference_loss(
    loss_type: str,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> LossOutput:
    """Compute the preference loss named ``loss_type`` (a key of :data:`PREFERENCE_LOSSES`).

    Each variant receives only what it uses: reference log-probs for all but the reference-free losses
    (:data:`REFERENCE_FREE_LOSSES`), lengths for ``"ipo"`` and ``"simpo"``, ``label_smoothing`` for
    ``"sigmoid"``, ``"robust"`` and ``"simpo"``, ``gamma`` for ``"simpo"`` only (ignored otherwise).

    Raises:
        ValueError: for an unknown ``loss_type`` (the message lists the valid names); when a required input is
            missing (reference log-probs for a reference-based loss, lengths for ``"ipo"`` / ``"simpo"``); or
            when a non-zero ``label_smoothing`` is given to a loss that does not support it.
    """
    _check_loss_type(loss_type)
    fn = PREFERENCE_LOSSES[loss_type]
    kwargs: dict[str, object] = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "beta": beta,
    }
    if loss_type not in REFERENCE_FREE_LOSSES:
        refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
        missing = [name for name, value in refs.items() if value is None]
        if missing:
            raise ValueError(
                f"loss_type {loss_type!r} needs reference log-probs but {', '.join(missing)} "
                f"{'was' if len(missing) == 1 else 'were'} not given (reference-free losses: "
                f"{', '.join(sorted(REFERENCE_FREE_LOSSES))})"
            )
        kwargs["ref_chosen_logps"] = ref_chosen_logps
        kwargs["ref_rejected_logps"] = ref_rejected_logps
    if loss_type in _NEEDS_LENGTHS:
        lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        missing = [name for name, value in lengths.items() if value is None]
        if missing:
            raise ValueError(
                f"loss_type {loss_type!r} is length-normalised and needs chosen_lengths and "
                f"rejected_lengths; missing: {', '.join(missing)}"
            )
        kwargs["chosen_lengths"] = chosen_lengths
        kwargs["rejected_lengths"] = rejected_lengths
    _check_supports_label_smoothing(loss_type, label_smoothing)
    if loss_type in LABEL_SMOOTHING_LOSSES:
        kwargs["label_smoothing"] = label_smoothing
    if loss_type == "simpo":
        kwargs["gamma"] = gamma
    return fn(**kwargs)
