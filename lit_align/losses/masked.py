"""Masked reductions over token positions (torch only, no Lightning): :func:`masked_mean`,
:func:`masked_mean_var` and :func:`masked_whiten`.

They serve the token-level losses of :mod:`lit_align.losses.policy_gradient` and PPO's reward / advantage whitening;
``sum_across_ranks`` makes the statistics those of the global batch under DDP / FSDP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SumAcrossRanks", "masked_mean", "masked_mean_var", "masked_whiten"]


def masked_mean(values: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is non-zero: ``Σ(values·mask) / Σ(mask)``.

    Args:
        values: any floating tensor.
        mask: bool or numeric tensor broadcastable to ``values``; numeric masks act as weights.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked mean, in ``values.dtype``. Where the mask sums to 0 (e.g. an empty completion, or a batch
        with no valid tokens) the result is **0** rather than NaN, and no gradient NaNs are produced.

    Masked-out positions are *selected away* (``torch.where``) rather than only multiplied by 0, so ``-inf`` /
    ``NaN`` values at padding positions (common for log-probs of pad tokens) do not poison the result.
    """
    mask = torch.broadcast_to(mask, values.shape)
    keep = mask != 0
    weights = mask.to(values.dtype)
    masked = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)) * weights
    if dim is None:
        numerator, denominator = masked.sum(), weights.sum()
    else:
        numerator, denominator = masked.sum(dim=dim), weights.sum(dim=dim)
    nonempty = denominator != 0
    safe_denominator = torch.where(nonempty, denominator, torch.ones_like(denominator))
    return torch.where(nonempty, numerator / safe_denominator, torch.zeros_like(numerator))


SumAcrossRanks = Callable[[Tensor], Tensor]


def masked_mean_var(
    values: Tensor, mask: Tensor, unbiased: bool = True, sum_across_ranks: SumAcrossRanks | None = None
) -> tuple[Tensor, Tensor]:
    """Mean and variance over the masked entries (Bessel-corrected by default, as TRL's ``masked_var``).

    ``sum_across_ranks`` (e.g. ``AlignmentModule.sum_across_ranks``) makes both statistics those of the masked
    entries of *all* ranks, so whitening under DDP/FSDP equals whitening the global batch in one process (TRL
    whitens each rank's batch on its own)."""
    total = _identity if sum_across_ranks is None else sum_across_ranks
    mask = mask.to(values.dtype)
    sums = total(torch.stack([(values * mask).sum(), mask.sum()]))
    mean, count = sums[0] / sums[1].clamp_min(1), sums[1]
    variance = total(((values - mean) ** 2 * mask).sum()) / count.clamp_min(1)
    if unbiased:
        if count < 2:
            raise ValueError("an unbiased masked variance needs at least 2 unmasked entries")
        variance = variance * count / (count - 1)
    return mean, variance


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    sum_across_ranks: SumAcrossRanks | None = None,
) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over masked entries (of all ranks with ``sum_across_ranks``);
    ``shift_mean=False`` adds the mean back (reward whitening keeps the reward's sign on average). Entries outside
    the mask are returned as 0."""
    mean, variance = masked_mean_var(values, mask, sum_across_ranks=sum_across_ranks)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
