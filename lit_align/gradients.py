"""Per-example gradient geometry of margin-based losses (Yuan et al. 2024, "A Common Pitfall of Margin-based
Language Model Alignment: Gradient Entanglement").

``g_w = ∇_θ log π(y_w|x)`` and ``g_l = ∇_θ log π(y_l|x)`` are gradients of *sequence-summed* completion log-probs.
:func:`margin_coefficients` (and :func:`kto_margin_coefficients`) give each loss's ``(c_w, c_l)``;
:func:`margin_loss_slope` gives ``−ℓ'(m)`` per pair, whose sign says whether the loss widens or narrows the margin;
:func:`entanglement_condition` turns them and the inner products into "does this pair's own step lower the chosen /
raise the rejected log-prob"; :func:`normalized_pair_objective` is the pairwise-normalised mitigation used by
``DPOModule(normalize_pair_gradients=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_align.losses.preference import PREFERENCE_LOSSES, preference_loss

# A per-example gradient norm below this is treated as this (an empty completion has g = 0).
MIN_GRADIENT_NORM = 1e-12


def margin_coefficients(
    loss_type: str,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> tuple[Tensor, Tensor]:
    """Effective margin coefficients ``(c_w, c_l)`` of a pairwise loss, per pair.

    Every pairwise loss here is ``L = ℓ(m)`` with ``m = c_w·log π(y_w|x) − c_l·log π(y_l|x) + (θ-free terms)``, so
    its gradient is ``ℓ'(m)·(c_w·g_w − c_l·g_l)`` with ``g = ∇_θ log π(y|x)``. One small step of size ``η`` on one
    pair then moves the log-probs by (first order, Yuan et al. 2024, "A Common Pitfall of Margin-based Language
    Model Alignment: Gradient Entanglement", Sec. 3)::

        Δ log π_w = −η·ℓ'(m)·(c_w·‖g_w‖² − c_l·⟨g_w, g_l⟩)
        Δ log π_l = −η·ℓ'(m)·(c_w·⟨g_w, g_l⟩ − c_l·‖g_l‖²)

    With ``−ℓ'(m) > 0`` (the loss still wants a larger margin) the chosen log-prob rises iff
    ``⟨g_w, g_l⟩ < (c_w/c_l)·‖g_w‖²`` and the rejected one falls iff ``⟨g_w, g_l⟩ < (c_l/c_w)·‖g_l‖²``. With
    ``−ℓ'(m) < 0`` (IPO past its target ``m > 1/(2β)``; cDPO once ``σ(m) > 1−ε``) the loss narrows the margin and
    both moves flip; with ``ℓ'(m) = 0`` (hinge past its margin) the pair does not move at all.
    :func:`margin_loss_slope` gives ``−ℓ'(m)`` per pair.

    =========  ====================================  ===============  ===============  ===========================
    loss_type  margin m                              c_w              c_l              ℓ(m)
    =========  ====================================  ===============  ===============  ===========================
    sigmoid    β·(Δ_w − Δ_l), Δ = log π − log π_ref  β                β                −log σ(m) (cDPO: smoothed)
    robust     β·(Δ_w − Δ_l)                         β                β                rDPO's unbiased mix
    hinge      β·(Δ_w − Δ_l)                         β                β                relu(1 − m); ℓ' = 0 past 1
    ipo        Δ_w/|y_w| − Δ_l/|y_l|                 1/|y_w|          1/|y_l|          (m − 1/(2β))²; ℓ' > 0 past
                                                                                       the target: both moves flip
    simpo      β·log π_w/|y_w| − β·log π_l/|y_l|     β/|y_w|          β/|y_l|          −log σ(m − γ)
    KTO        none (unpaired): see                  λ_D·β·σ(x_w)     λ_U·β·σ(x_l)     see kto_margin_coefficients
               :func:`kto_margin_coefficients`       ·σ(−x_w)         ·σ(−x_l)
    =========  ====================================  ===============  ===============  ===========================

    For the reference-based losses the reference terms are θ-free, so only the policy log-probs carry
    ``c``; for DPO the condition is the paper's ``⟨g_w, g_l⟩ < min(‖g_w‖², ‖g_l‖²)``. SimPO's and IPO's
    length weights make it asymmetric: a long chosen answer (small ``c_w``) is more likely to fall.

    Args:
        loss_type: a key of :data:`~lit_align.losses.PREFERENCE_LOSSES`.
        beta: the loss's β; chosen_lengths / rejected_lengths: completion token counts ``[B]`` (clamped to >= 1).

    Returns:
        ``(c_w, c_l)``, each ``[B]``, in the dtype of ``chosen_lengths`` if floating, else float32.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"Unknown preference loss_type {loss_type!r}; valid names are: {sorted(PREFERENCE_LOSSES)}")
    dtype = chosen_lengths.dtype if chosen_lengths.is_floating_point() else torch.float32
    chosen = torch.as_tensor(chosen_lengths, dtype=dtype).clamp_min(1)
    rejected = torch.as_tensor(rejected_lengths, dtype=dtype, device=chosen.device).clamp_min(1)
    if loss_type == "ipo":
        return 1.0 / chosen, 1.0 / rejected
    if loss_type == "simpo":
        return beta / chosen, beta / rejected
    return torch.full_like(chosen, beta), torch.full_like(rejected, beta)


def margin_loss_slope(
    loss_type: str,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> Tensor:
    """``s = −ℓ'(m)`` of each pair: how hard, and which way, its loss pushes the margin ``m`` of
    :func:`margin_coefficients`. ``s > 0``: the loss widens the margin; ``s < 0``: it narrows it; ``s = 0``: flat.

    Taken from the loss itself (:func:`~lit_align.losses.preference_loss`, autograd in float64):
    ``∂L/∂log π_w = ℓ'(m)·c_w`` with ``c_w > 0``, so ``s = −(∂L/∂log π_w)/c_w``. For the losses here:

    * ``sigmoid`` (cDPO, smoothing ε): ``s = (1−ε) − σ(m)`` — negative once ``σ(m) > 1−ε``, i.e. past cDPO's
      optimum ``m = log((1−ε)/ε)``; plain DPO (ε = 0) is ``σ(−m) > 0`` always;
    * ``ipo``: ``s = −2·(m − 1/(2β))`` — negative once the length-normalised margin passes its target ``1/(2β)``;
    * ``hinge``: 1 while ``m < 1``, then 0; ``robust`` and ``simpo`` (ε < ½): always > 0.

    Arguments as :func:`~lit_align.losses.preference_loss` (sequence-summed log-probs ``[B]``, lengths ``[B]``).
    Returns ``[B]`` in float64.
    """
    with torch.enable_grad():
        chosen = policy_chosen_logps.detach().double().requires_grad_(True)

        def double(value: Tensor | None) -> Tensor | None:
            return None if value is None else torch.as_tensor(value).detach().double()

        out = preference_loss(
            loss_type,
            policy_chosen_logps=chosen,
            policy_rejected_logps=double(policy_rejected_logps),
            ref_chosen_logps=double(ref_chosen_logps),
            ref_rejected_logps=double(ref_rejected_logps),
            chosen_lengths=double(chosen_lengths),
            rejected_lengths=double(rejected_lengths),
            beta=beta,
            label_smoothing=label_smoothing,
            gamma=gamma,
        )
        (d_chosen,) = torch.autograd.grad(out.losses.sum(), [chosen])
    c_chosen, _ = margin_coefficients(
        loss_type, beta=beta, chosen_lengths=double(chosen_lengths), rejected_lengths=double(rejected_lengths)
    )
    return -d_chosen / c_chosen


def kto_margin_coefficients(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    reference_point: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO's ``(c_w, c_l)`` for a desirable ``y_w`` and an undesirable ``y_l`` of one prompt (see
    :func:`~lit_align.losses.kto_loss`).

    KTO has no margin, but the same first-order analysis applies to the sum of the two rows' losses. With
    ``r = log π − log π_ref``, ``x_w = β·(r_w − z)`` and ``x_l = β·(z − r_l)`` (``z`` detached)::

        ∂/∂log π_w  λ_D·σ(−x_w) = −λ_D·β·σ(x_w)·σ(−x_w)  =: −c_w
        ∂/∂log π_l  λ_U·σ(−x_l) = +λ_U·β·σ(x_l)·σ(−x_l)  =: +c_l

    so a step moves the log-probs as in :func:`margin_coefficients` with ``−ℓ' = 1`` (slope 1 in
    :func:`entanglement_condition`: both coefficients are > 0, KTO always pushes the desirable row up and the
    undesirable one down). The coefficients depend on
    the current rewards: a row far past ``z`` stops pulling, which makes ``c_w/c_l`` drift during training.
    """
    z = torch.as_tensor(reference_point, dtype=chosen_logratios.dtype, device=chosen_logratios.device)
    x_w = beta * (chosen_logratios - z)
    x_l = beta * (z - rejected_logratios)
    c_w = desirable_weight * beta * torch.sigmoid(x_w) * torch.sigmoid(-x_w)
    c_l = undesirable_weight * beta * torch.sigmoid(x_l) * torch.sigmoid(-x_l)
    return c_w, c_l


def entanglement_condition(
    inner: Tensor,
    chosen_norm_sq: Tensor,
    rejected_norm_sq: Tensor,
    c_chosen: Tensor,
    c_rejected: Tensor,
    slope: Tensor,
) -> tuple[Tensor, Tensor]:
    """Which pairs' own step lowers the chosen / raises the rejected log-prob (first order).

    From ``Δ log π_w = η·s·(c_w·‖g_w‖² − c_l·⟨g_w,g_l⟩)`` and ``Δ log π_l = η·s·(c_w·⟨g_w,g_l⟩ − c_l·‖g_l‖²)``
    with ``s = −ℓ'(m)`` the pair's ``slope`` (:func:`margin_loss_slope`; derivation in
    :func:`margin_coefficients`). Only the sign of ``s`` matters: ``s > 0`` is the usual case (the loss widens
    the margin), ``s < 0`` flips both moves (IPO past ``1/(2β)``, cDPO once ``σ(m) > 1−ε``), ``s = 0`` (hinge past
    its margin) moves nothing, so neither flag is set.

    Returns:
        ``(chosen_falls, rejected_rises)``: bool tensors ``[B]``. With ``s > 0`` at most one of them holds for a
        pair (Cauchy–Schwarz, ``c > 0``), so the margin grows; with ``s < 0`` the margin shrinks, so at least one
        holds — usually both.
    """
    slope = slope.to(inner)
    chosen_falls = slope * (c_chosen * chosen_norm_sq - c_rejected * inner) < 0
    rejected_rises = slope * (c_chosen * inner - c_rejected * rejected_norm_sq) > 0
    return chosen_falls, rejected_rises


def per_example_gradient_norms(values: Tensor, parameters: Sequence[nn.Parameter]) -> Tensor:
    """``‖∇_θ values[i]‖`` over ``parameters`` for each ``i``, keeping the graph for a later backward.

    One ``autograd.grad`` per example. The batched alternative (``is_grads_batched=True``, i.e. vmap over the
    backward) holds a copy of every activation gradient per example: on the 135M embedded model it ran out of
    24 GB at 4 sequences × 96 tokens, while this loop needs one gradient's memory at a time. Restricting
    ``parameters`` (e.g. to LoRA adapters or the last blocks) also shortens each backward.
    """
    norms = []
    for value in values.unbind():
        grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        norms.append(torch.stack(squares).sum().sqrt() if squares else values.new_zeros((), dtype=torch.float32))
    return torch.stack(norms)


def normalized_pair_objective(
    losses: Tensor, chosen_logps: Tensor, rejected_logps: Tensor, parameters: Sequence[nn.Parameter]
) -> Tensor:
    """Pairwise-normalised gradient descent on a margin loss ("normalized preference optimization").

    A pair's loss gradient is ``a_w·g_w + a_l·g_l`` with ``a_w = ∂L/∂log π_w`` (< 0 while the loss wants a larger
    margin) and ``a_l = ∂L/∂log π_l`` (> 0). This replaces it by ``−s·(g_w/‖g_w‖ − g_l/‖g_l‖)`` with the loss
    derivative ``s = (a_l − a_w)/2`` (for DPO ``s = β·σ(−β·Δ)``, the same scale as DPO's own step). A step of size
    ``η`` then moves, to first order,

        ``Δ log π_w = η·s·‖g_w‖·(1 − cos(g_w, g_l)) ≥ 0``,  ``Δ log π_l = −η·s·‖g_l‖·(1 − cos(g_w, g_l)) ≤ 0``,

    whatever the inner product, so the entanglement condition cannot fail for the pair itself. The losses'
    own asymmetric ``c_w ≠ c_l`` (SimPO, IPO length weights) is deliberately dropped: keeping it would bring back
    the condition ``c_w > c_l·cos``. The norms and ``s`` are constants (stop-gradient) of the surrogate.

    Returns:
        Per-pair values equal to ``losses`` (so logging is unchanged) whose gradient is the normalised direction.
    """
    a_chosen, a_rejected = torch.autograd.grad(losses.sum(), [chosen_logps, rejected_logps], retain_graph=True)
    scale = (a_rejected - a_chosen) / 2
    norms = per_example_gradient_norms(torch.cat([chosen_logps, rejected_logps]), parameters)
    chosen_norm, rejected_norm = norms.clamp_min(MIN_GRADIENT_NORM).to(chosen_logps.dtype).chunk(2)
    surrogate = scale * (rejected_logps / rejected_norm - chosen_logps / chosen_norm)
    return losses.detach() + surrogate - surrogate.detach()
