"""PPO's pure math against values worked out by hand in the comments (issue 3 groundwork)."""

import math

import pytest
import torch
from torch.testing import assert_close

from lit_align.losses import clipped_policy_loss, clipped_value_loss, kl_penalty
from lit_align.ppo import AdaptiveKLController, gae, group_normalized_advantages, masked_whiten, rloo_advantages


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ2 = 1 − 0.3 = 0.7; δ1 = 0.9·0.3 − 0.4 = −0.13, A1 = −0.13 + 0.72·0.7 = 0.374;
    #        δ0 = 0.9·0.4 − 0.5 = −0.14, A0 = −0.14 + 0.72·0.374 = 0.12928
    # row 1: the padded step is ignored (V = r = 0 there): A1 = 2 − 2 = 0, A0 = 0.9·2 − 1 = 0.8
    assert_close(advantages, torch.tensor([[0.12928, 0.374, 0.7], [0.8, 0.0, 0.0]]))
    assert_close(returns, torch.tensor([[0.62928, 0.774, 1.0], [1.8, 2.0, 0.0]]))


def test_masked_whiten_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1; the masked 100 plays no part
    assert_close(masked_whiten(values, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]), atol=1e-6, rtol=0)


def test_kl_estimators_by_hand():
    logprobs, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([0.5, 0.0]))
    # k3 with log r = −0.5: e^−0.5 − 1 + 0.5
    assert_close(kl_penalty(logprobs, ref, "k3"), torch.tensor([math.exp(-0.5) - 0.5, 0.0]))
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logprobs, ref, "k2")


def test_clipped_policy_loss_by_hand():
    logprobs = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    old = torch.zeros(3)
    advantages = torch.tensor([1.0, -1.0, 2.0])
    # ρ=1.5, A=1: max(−1.5, −1.2) = −1.2 (clipped); ρ=0.5, A=−1: max(0.5, 0.8) = 0.8 (clipped);
    # ρ=1.1, A=2: max(−2.2, −2.2) = −2.2 (inside the trust region)
    out = clipped_policy_loss(logprobs, old, advantages, torch.ones(3), clip_range=0.2)
    assert_close(out.loss, torch.tensor((-1.2 + 0.8 - 2.2) / 3))
    assert_close(out.clipfrac, torch.tensor(2 / 3))
    masked = clipped_policy_loss(logprobs, old, advantages, torch.tensor([1, 1, 0]), clip_range=0.2)
    assert_close(masked.loss, torch.tensor((-1.2 + 0.8) / 2))


def test_clipped_value_loss_by_hand():
    values, old = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.1])
    returns = torch.tensor([2.0, 0.0])
    # token 0: clip(1.0, 0.3, 0.7) = 0.7 → max((1 − 2)², (0.7 − 2)²) = 1.69; token 1: clip(0, −0.1, 0.3) = 0 → 0
    out = clipped_value_loss(values, old, returns, torch.ones(2), clip_range=0.2)
    assert_close(out.loss, torch.tensor(0.5 * 1.69 / 2))
    assert_close(out.clipfrac, torch.tensor(0.5))


def test_rloo_and_group_normalisation_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])
    # group 1: baselines (6−1)/2, (6−2)/2, (6−3)/2; group 2 (sum 36): 13, 13, 10
    assert_close(rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    # group 2: mean 12, unbiased std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    expected = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]) / torch.tensor([1.0, 1, 1, 12**0.5, 12**0.5, 12**0.5])
    assert_close(group_normalized_advantages(scores, 3, eps=0.0), expected)
    with pytest.raises(ValueError, match="2 samples"):
        rloo_advantages(scores, 1)


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL 9 → error clipped to +0.2: 0.2·(1 + 0.2·256/10000)
    assert controller.update(9.0, 256) == pytest.approx(0.2 * 1.00512)
    # KL 5.4 → error −0.1: ×(1 − 0.1·256/10000)
    assert controller.update(5.4, 256) == pytest.approx(0.2 * 1.00512 * 0.99744)
    restored = AdaptiveKLController()
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value and restored.target == 6.0
