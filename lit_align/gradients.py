"""Per-example gradient geometry of margin-based losses (Yuan et al. 2024, "A Common Pitfall of Margin-based
Language Model Alignment: Gradient Entanglement").

``g_w = ∇_θ log π(y_w|x)`` and ``g_l = ∇_θ log π(y_l|x)`` are gradients of *sequence-summed* completion log-probs.
:func:`~lit_align.losses.margin_coefficients` gives each loss's ``(c_w, c_l)``; :func:`entanglement_condition`
turns them and the inner products into "does this pair's own step lower the chosen / raise the rejected
log-prob"; :func:`normalized_pair_objective` is the pairwise-normalised mitigation used by
``DPOModule(normalize_pair_gradients=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# A per-example gradient norm below this is treated as this (an empty completion has g = 0).
MIN_GRADIENT_NORM = 1e-12


def entanglement_condition(
    inner: Tensor, chosen_norm_sq: Tensor, rejected_norm_sq: Tensor, c_chosen: Tensor, c_rejected: Tensor
) -> tuple[Tensor, Tensor]:
    """Which pairs violate "chosen up, rejected down" under their own step (first order, ``−ℓ'(m) > 0``).

    From ``Δ log π_w ∝ c_w·‖g_w‖² − c_l·⟨g_w,g_l⟩`` and ``Δ log π_l ∝ c_w·⟨g_w,g_l⟩ − c_l·‖g_l‖²``
    (derivation in :func:`~lit_align.losses.margin_coefficients`).

    Returns:
        ``(chosen_falls, rejected_rises)``: bool tensors ``[B]``. By Cauchy–Schwarz and ``c > 0`` at most one of
        them holds for a pair, so the margin itself always grows.
    """
    chosen_falls = c_rejected * inner > c_chosen * chosen_norm_sq
    rejected_rises = c_chosen * inner > c_rejected * rejected_norm_sq
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
