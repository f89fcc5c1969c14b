"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022) — the advantage math.

This file will tell PPO's whole story in order: rollout → score → KL-shaped rewards → advantages → clipped
updates. What is here so far is the part every variant shares and that is tested against hand-computed values:

* ``masked_whiten`` — normalise advantages (or rewards) over the real tokens only;
* ``gae`` — generalised advantage estimation over a response (Schulman et al. 2016, Eq. 16);
* ``rloo_advantages`` / ``group_normalized_advantages`` — the critic-free baselines over k samples per prompt
  (RLOO: Ahmadian et al. 2024; GRPO: Shao et al. 2024);
* ``AdaptiveKLController`` — the KL coefficient controller of Ziegler et al. 2019 (§2.2).

The clipped policy/value losses and the KL estimators live in ``lit_align.losses``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_align.losses import masked_mean


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked entries (Bessel-corrected by default, as TRL's ``masked_var``)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError("an unbiased masked variance needs at least 2 unmasked entries")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over masked entries; ``shift_mean=False`` adds the mean back (reward
    whitening keeps the reward's sign on average). Entries outside the mask are returned as 0."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses [B, T] (Schulman et al. 2016, Eq. 16).

    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}``, with ``V`` and ``r`` zero outside ``mask``, so
    the value after the last real token is 0 (the episode ends there). Returns ``(advantages, returns = A + V)``,
    both zero outside the mask.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def rloo_advantages(scores: Tensor, samples_per_prompt: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, Eq. 7): ``A_i = r_i − mean_{j≠i} r_j`` within each group
    of ``k`` consecutive samples of one prompt (``scores`` [N·k], grouped as ``[p0s0, p0s1, …, p1s0, …]``)."""
    k = samples_per_prompt
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = scores.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).flatten()


def group_normalized_advantages(scores: Tensor, samples_per_prompt: int, eps: float = 1e-4) -> Tensor:
    """GRPO's group-normalised advantage (Shao et al. 2024, §4.1.2): ``(r − mean_group) / (std_group + eps)``,
    with the unbiased standard deviation (TRL's ``scale_rewards="group"``)."""
    grouped = scores.view(-1, samples_per_prompt)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).flatten()


class AdaptiveKLController:
    """Proportional controller for the KL coefficient β (Ziegler et al. 2019, §2.2):
    ``e = clip(KL/KL_target − 1, −0.2, 0.2)``, ``β ← β·(1 + e·n_steps/horizon)``."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10_000) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], int(state["horizon"])
