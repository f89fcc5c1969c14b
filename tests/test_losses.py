"""Tests for lit_align.losses: golden values written out independently with ``math`` on scalars."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lit_align.losses import (
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
    masked_mean,
    preference_loss,
    robust_loss,
    simpo_loss,
)

# Three examples with non-trivial numbers. Δ = (πc − rc) − (πr − rr) = [1.5, -2.5, 0.9].
PC = [-10.0, -25.5, -7.2]
PR = [-12.0, -20.0, -9.1]
RC = [-11.0, -24.0, -7.0]
RR = [-11.5, -21.0, -8.0]
LC = [4, 10, 3]
LR = [7, 2, 5]
BETA = 0.5
EPS = 0.2


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def log_sig(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


def deltas() -> list[float]:
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)]


def ref_rewards(beta: float) -> tuple[list[float], list[float]]:
    return [beta * (p - r) for p, r in zip(PC, RC, strict=True)], [beta * (p - r) for p, r in zip(PR, RR, strict=True)]


def ref_inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {
        "policy_chosen_logps": t(PC, requires_grad),
        "policy_rejected_logps": t(PR, requires_grad),
        "ref_chosen_logps": t(RC, requires_grad),
        "ref_rejected_logps": t(RR, requires_grad),
    }


def check_rewards(out: LossOutput, chosen: list[float], rejected: list[float]) -> None:
    assert_close(out.chosen_rewards, t(chosen))
    assert_close(out.rejected_rewards, t(rejected))
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad


# --------------------------------------------------------------------------------------------------------
# golden values
# --------------------------------------------------------------------------------------------------------


def test_deltas_fixture_is_nontrivial():
    assert [round(d, 10) for d in deltas()] == [1.5, -2.5, 0.9]


def test_dpo_sigmoid_golden_with_label_smoothing():
    expected = [-(1 - EPS) * log_sig(BETA * d) - EPS * log_sig(-BETA * d) for d in deltas()]
    out = dpo_sigmoid_loss(**ref_inputs(), beta=BETA, label_smoothing=EPS)
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (3,)
    assert_close(out.losses, t(expected))
    check_rewards(out, *ref_rewards(BETA))


def test_dpo_sigmoid_without_smoothing_is_minus_logsigmoid():
    expected = [-math.log(1 / (1 + math.exp(-BETA * d))) for d in deltas()]
    out = dpo_sigmoid_loss(**ref_inputs(), beta=BETA)
    assert_close(out.losses, t(expected))
    assert_close(out.losses, -torch.nn.functional.logsigmoid(BETA * t(deltas())))


def test_ipo_golden_length_normalised():
    expected = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR, strict=True):
        h = (pc - rc) / lc - (pr - rr) / lr
        expected.append((h - 1 / (2 * BETA)) ** 2)
    out = ipo_loss(**ref_inputs(), beta=BETA, chosen_lengths=t(LC), rejected_lengths=torch.tensor(LR))
    assert_close(out.losses, t(expected))
    # rewards use the summed (not length-normalised) log-ratios
    check_rewards(out, *ref_rewards(BETA))


def test_hinge_golden():
    beta = 0.8
    expected = [max(0.0, 1 - beta * d) for d in deltas()]  # [0.0, 3.0, 0.28]
    out = hinge_loss(**ref_inputs(), beta=beta)
    assert_close(out.losses, t(expected))
    assert out.losses[0].item() == 0.0
    check_rewards(out, *ref_rewards(beta))


def test_robust_golden():
    expected = [(-(1 - EPS) * log_sig(BETA * d) + EPS * log_sig(-BETA * d)) / (1 - 2 * EPS) for d in deltas()]
    out = robust_loss(**ref_inputs(), beta=BETA, label_smoothing=EPS)
    assert_close(out.losses, t(expected))
    check_rewards(out, *ref_rewards(BETA))


def test_robust_with_zero_eps_equals_sigmoid():
    robust = robust_loss(**ref_inputs(), beta=BETA, label_smoothing=0.0)
    sigmoid = dpo_sigmoid_loss(**ref_inputs(), beta=BETA, label_smoothing=0.0)
    assert_close(robust.losses, sigmoid.losses)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(**ref_inputs(), beta=BETA, label_smoothing=eps)


@pytest.mark.parametrize("eps", [0.0, EPS])
def test_simpo_golden(eps):
    beta, gamma = 2.0, 0.7
    expected, exp_chosen, exp_rejected = [], [], []
    for pc, pr, lc, lr in zip(PC, PR, LC, LR, strict=True):
        x = beta * pc / lc - beta * pr / lr - gamma
        expected.append(-(1 - eps) * log_sig(x) - eps * log_sig(-x))
        exp_chosen.append(beta * pc / lc)
        exp_rejected.append(beta * pr / lr)
    out = simpo_loss(t(PC), t(PR), t(LC), t(LR), beta=beta, gamma=gamma, label_smoothing=eps)
    assert_close(out.losses, t(expected))
    check_rewards(out, exp_chosen, exp_rejected)


def test_kto_golden_branches_and_weights():
    logps = [-10.0, -25.5, -7.2, -9.1]
    refs = [-11.0, -24.0, -7.0, -8.0]
    desirable = [True, False, True, False]
    z, beta, w_d, w_u = 0.3, BETA, 1.5, 0.75
    expected = []
    for p, r, d in zip(logps, refs, desirable, strict=True):
        rr = p - r
        if d:
            expected.append(w_d * (1 - sig(beta * (rr - z))))
        else:
            expected.append(w_u * (1 - sig(beta * (z - rr))))
    out = kto_loss(
        t(logps),
        t(refs),
        torch.tensor(desirable),
        torch.tensor(z),
        beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )
    assert isinstance(out, KTOOutput)
    assert_close(out.losses, t(expected))
    assert_close(out.rewards, t([beta * (p - r) for p, r in zip(logps, refs, strict=True)]))
    assert not out.rewards.requires_grad

    # the weights scale their own branch only
    unweighted = kto_loss(t(logps), t(refs), torch.tensor(desirable), z, beta)
    assert_close(out.losses[0::2], w_d * unweighted.losses[0::2])
    assert_close(out.losses[1::2], w_u * unweighted.losses[1::2])


def test_kto_branches_move_in_opposite_directions():
    ref = t([0.0, 0.0])
    low, high = t([-1.0, -1.0]), t([1.0, 1.0])
    flags = torch.tensor([True, False])
    lo, hi = kto_loss(low, ref, flags, 0.0, 1.0).losses, kto_loss(high, ref, flags, 0.0, 1.0).losses
    assert hi[0] < lo[0]  # desirable: raising the log-ratio lowers the loss
    assert hi[1] > lo[1]  # undesirable: raising the log-ratio raises the loss


def test_kto_kl_estimate_clamps_and_detaches():
    pol = t([-5.0, -3.0, -4.0], requires_grad=True)
    ref = t([-4.0, -3.5, -3.0])
    z = kto_kl_estimate(pol, ref)  # mean(-1, 0.5, -1) < 0 → 0
    assert z.shape == ()
    assert z.item() == 0.0
    assert not z.requires_grad

    pol2 = t([-2.0, -3.0], requires_grad=True)
    z2 = kto_kl_estimate(pol2, t([-4.0, -3.5]))  # mean(2, 0.5) = 1.25
    assert_close(z2, torch.tensor(1.25, dtype=torch.float64))
    assert not z2.requires_grad

    assert kto_kl_estimate(t([]), t([])).item() == 0.0  # empty → 0, not NaN


def test_bradley_terry_golden():
    sc, sr, margin, c = [1.2, -0.3, 0.4], [0.5, 0.9, 0.4], [0.1, 0.0, 1.0], 0.01
    expected = [-log_sig(a - b - m) + c * (a + b) ** 2 for a, b, m in zip(sc, sr, margin, strict=True)]
    assert_close(bradley_terry_loss(t(sc), t(sr), margin=t(margin), center_coefficient=c), t(expected))
    plain = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(sc, sr, strict=True)]
    assert_close(bradley_terry_loss(t(sc), t(sr)), t(plain))


# --------------------------------------------------------------------------------------------------------
# gradients and numerics
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(PREFERENCE_LOSSES))
def test_gradients_reach_policy_only(loss_type):
    inputs = ref_inputs(requires_grad=False)
    pc = inputs["policy_chosen_logps"].requires_grad_()
    pr = inputs["policy_rejected_logps"].requires_grad_()
    out = preference_loss(
        loss_type,
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=inputs["ref_chosen_logps"],
        ref_rejected_logps=inputs["ref_rejected_logps"],
        chosen_lengths=t(LC),
        rejected_lengths=t(LR),
        beta=BETA,
    )
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.chosen_rewards.grad_fn is None
    # hinge is 0 for example 0 (βΔ > 1) → use example 1, which is active for every loss
    out.losses[1].backward()
    assert pc.grad is not None and pc.grad[1] != 0
    assert pr.grad is not None and pr.grad[1] != 0
    assert inputs["ref_chosen_logps"].grad is None
    assert inputs["ref_rejected_logps"].grad is None


def test_reference_logps_get_no_grad_even_when_they_require_it_via_rewards():
    inputs = ref_inputs(requires_grad=True)
    out = dpo_sigmoid_loss(**inputs, beta=BETA)
    # rewards are detached: summing them has no graph at all
    assert not (out.chosen_rewards + out.rejected_rewards).requires_grad


def test_kto_gradient_flows_to_policy_not_z():
    pol = t([-1.0, -2.0], requires_grad=True)
    ref = t([-1.5, -1.0])
    z = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    out = kto_loss(pol, ref, torch.tensor([True, False]), z.detach(), 0.5)
    out.losses.sum().backward()
    assert pol.grad is not None and torch.all(pol.grad != 0)
    assert z.grad is None and ref.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_beta_delta_stays_finite(dtype, sign):
    delta = sign * 1000.0
    pc = torch.tensor([delta, 0.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([0.0, -delta], dtype=dtype, requires_grad=True)
    zeros = torch.zeros(2, dtype=dtype)
    lengths = torch.tensor([1, 1])
    for loss_type in PREFERENCE_LOSSES:
        eps = 0.2 if loss_type in {"sigmoid", "robust", "simpo"} else 0.0
        out = preference_loss(
            loss_type,
            policy_chosen_logps=pc,
            policy_rejected_logps=pr,
            ref_chosen_logps=zeros,
            ref_rejected_logps=zeros,
            chosen_lengths=lengths,
            rejected_lengths=lengths,
            beta=1.0,
            label_smoothing=eps,
        )
        assert out.losses.dtype == dtype
        assert torch.isfinite(out.losses).all(), loss_type
        pc.grad = pr.grad = None
        out.losses.sum().backward()
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), loss_type
    # the sigmoid loss is ~0 in the right direction and ~|βΔ| in the wrong one
    out = dpo_sigmoid_loss(pc, pr, zeros, zeros, beta=1.0)
    expected = 0.0 if sign > 0 else 1000.0
    assert_close(out.losses[0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-3, rtol=1e-4)

    kto = kto_loss(pc, zeros, torch.tensor([True, False]), torch.tensor(0.0, dtype=dtype), beta=1.0)
    assert torch.isfinite(kto.losses).all()
    assert torch.isfinite(bradley_terry_loss(pc, pr, center_coefficient=0.01)).all()


# --------------------------------------------------------------------------------------------------------
# masked_mean
# --------------------------------------------------------------------------------------------------------


def test_masked_mean_basic_and_dims():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert_close(masked_mean(values, mask), torch.tensor(1.5, dtype=torch.float64))
    assert_close(masked_mean(values, mask, dim=1), t([1.5, 0.0]))  # empty row → 0
    assert_close(masked_mean(values, mask.float(), dim=0), t([1.0, 2.0, 0.0]))


def test_masked_mean_empty_mask_and_padding_infs():
    values = t([[float("-inf"), 2.0], [float("nan"), 4.0]]).requires_grad_()
    mask = torch.tensor([[0, 1], [0, 1]])
    result = masked_mean(values, mask)
    assert_close(result, torch.tensor(3.0, dtype=torch.float64))
    result.backward()
    assert torch.isfinite(values.grad).all()
    empty = masked_mean(t([1.0, 2.0]), torch.zeros(2, dtype=torch.bool))
    assert empty.item() == 0.0


# --------------------------------------------------------------------------------------------------------
# registry + dispatcher
# --------------------------------------------------------------------------------------------------------


def test_registry_contents():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "hinge", "robust", "simpo"}
    assert set(REFERENCE_FREE_LOSSES) == {"simpo"}


def test_dispatcher_matches_direct_calls():
    common = {"policy_chosen_logps": t(PC), "policy_rejected_logps": t(PR), "beta": BETA}
    refs = {"ref_chosen_logps": t(RC), "ref_rejected_logps": t(RR)}
    lengths = {"chosen_lengths": t(LC), "rejected_lengths": t(LR)}
    assert_close(
        preference_loss("sigmoid", **common, **refs, label_smoothing=EPS).losses,
        dpo_sigmoid_loss(**ref_inputs(), beta=BETA, label_smoothing=EPS).losses,
    )
    assert_close(
        preference_loss("ipo", **common, **refs, **lengths).losses,
        ipo_loss(**ref_inputs(), beta=BETA, **lengths).losses,
    )
    assert_close(preference_loss("hinge", **common, **refs).losses, hinge_loss(**ref_inputs(), beta=BETA).losses)
    assert_close(
        preference_loss("robust", **common, **refs, label_smoothing=EPS).losses,
        robust_loss(**ref_inputs(), beta=BETA, label_smoothing=EPS).losses,
    )
    assert_close(
        preference_loss("simpo", **common, **lengths, gamma=0.3).losses,  # no refs needed
        simpo_loss(t(PC), t(PR), t(LC), t(LR), beta=BETA, gamma=0.3).losses,
    )


def test_dispatcher_unknown_type_lists_valid_names():
    with pytest.raises(ValueError, match="dpo") as info:
        preference_loss("dpo", policy_chosen_logps=t(PC), policy_rejected_logps=t(PR), beta=BETA)
    for name in PREFERENCE_LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dispatcher_requires_reference_logps(loss_type):
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        preference_loss(
            loss_type,
            policy_chosen_logps=t(PC),
            policy_rejected_logps=t(PR),
            ref_chosen_logps=t(RC),
            chosen_lengths=t(LC),
            rejected_lengths=t(LR),
            beta=BETA,
        )


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_dispatcher_requires_lengths(loss_type):
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(
            loss_type,
            policy_chosen_logps=t(PC),
            policy_rejected_logps=t(PR),
            ref_chosen_logps=t(RC),
            ref_rejected_logps=t(RR),
            rejected_lengths=t(LR),
            beta=BETA,
        )


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_dispatcher_rejects_unsupported_label_smoothing(loss_type):
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(
            loss_type,
            **ref_inputs(),
            chosen_lengths=t(LC),
            rejected_lengths=t(LR),
            beta=BETA,
            label_smoothing=0.1,
        )


def test_invalid_beta_rejected():
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(**ref_inputs(), beta=0.0, chosen_lengths=1, rejected_lengths=1)
