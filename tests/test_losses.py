"""Tests for lit_align.losses: golden values written out independently with ``math`` on scalars; at the end, that
``KTOModule`` computes its reference point with :func:`kto_kl_estimate` (so the function tested here is the one that
runs) and that its ``last_reference_point`` is the clamped mean computed by hand."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lit_align.losses import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    KTOOutput,
    LossOutput,
    bradley_terry_loss,
    clipped_value_loss,
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


def test_dpo_sigmoid_matches_literal_golden_values():
    # −logσ(β·Δ) = log(1 + e^(−β·Δ)) at β = 0.5, Δ = [1.5, −2.5, 0.9], evaluated with 30-digit arithmetic
    # (mpmath) outside this code base and written out: pins the fixture, the sign of Δ and the loss together.
    out = dpo_sigmoid_loss(**ref_inputs(), beta=BETA)
    assert_close(out.losses, t([0.3868710061149, 1.50192908134537, 0.493248945997455]), rtol=0, atol=1e-12)


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


def other_rank(values: list[float]):
    """A stand-in for ``AlignmentModule.sum_across_ranks`` on 2 ranks: adds another rank's ``[Σ, count]``."""
    calls = []

    def sum_across_ranks(local: torch.Tensor) -> torch.Tensor:
        calls.append(local.clone())
        return local + t([sum(values), len(values)])

    return sum_across_ranks, calls


def test_kto_kl_estimate_takes_the_mean_over_all_ranks_before_the_clamp():
    pol, ref = t([-2.0, -3.0], requires_grad=True), t([-4.0, -3.5])  # this rank: log-ratios 2, 0.5 (mean 1.25)
    total, calls = other_rank([1.0, 3.0])
    z = kto_kl_estimate(pol, ref, sum_across_ranks=total)
    assert_close(calls[0], t([2.5, 2.0]))  # one collective on [Σ, count]
    assert_close(z, torch.tensor((2.0 + 0.5 + 1.0 + 3.0) / 4, dtype=torch.float64))
    assert not z.requires_grad
    # the other rank pulls the global mean below 0: clamped to 0 although this rank's mean is 1.25
    total, _ = other_rank([-4.0, -3.0, -2.0])
    assert kto_kl_estimate(pol, ref, sum_across_ranks=total).item() == 0.0
    # a rank with no pair still takes part and gets the others' mean
    total, _ = other_rank([1.0, 2.0])
    assert_close(kto_kl_estimate(t([]), t([]), sum_across_ranks=total), torch.tensor(1.5, dtype=torch.float64))


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
    # z and the reference log-probs *require* grad here: kto_loss itself must cut them off (z_ref is a fixed
    # reference point; the reference model is frozen), whatever the caller hands it.
    pol = t([-1.0, -2.0], requires_grad=True)
    ref = t([-1.5, -1.0], requires_grad=True)
    z = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    beta = 0.5
    out = kto_loss(pol, ref, torch.tensor([True, False]), z, beta)
    out.losses.sum().backward()
    # d/dr σ(−β(r − z)) = −β·σ'(…) for the desirable row, +β·σ'(…) for the undesirable row (σ' = σ(1 − σ))
    r = [-1.0 - -1.5, -2.0 - -1.0]
    expected = [
        -beta * sig(beta * (r[0] - 0.2)) * (1 - sig(beta * (r[0] - 0.2))),
        beta * sig(beta * (0.2 - r[1])) * (1 - sig(beta * (0.2 - r[1]))),
    ]
    assert_close(pol.grad, t(expected))
    assert z.grad is None, "gradient reached the reference point z"
    assert ref.grad is None, "gradient reached the reference log-probs"


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


# --------------------------------------------------------------------------------------------------------
# KTOModule runs these functions: its z_ref is kto_kl_estimate over every rank, and it reaches the loss as computed
# --------------------------------------------------------------------------------------------------------


def hand_sequence_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Σ over completion tokens of log_softmax(logits)[next token]: a plain full-vocabulary forward (no
    ``logits_to_keep``, no ``lit_align.logprobs``)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.double()
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (picked * completion_mask[:, 1:]).sum(-1)


def hand_kl_log_ratios(module, batch) -> torch.Tensor:
    """log π(y'|x) − log π_ref(y'|x) on the batch's mismatched KL pairs, computed by hand."""
    kl = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])
    return hand_sequence_logps(module.policy, *kl) - hand_sequence_logps(module.reference, *kl)


def perturbed(model, seed: int = 0, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def kto_with_batch(hh_dir, perturb: str = "policy"):
    from helpers import hh_pairs

    from lit_align import KTOModule

    module = KTOModule(model="tiny-llama")
    module.configure_model()
    perturbed(getattr(module, perturb))  # so the policy and reference differ and z_ref is not trivially 0
    data = hh_pairs(hh_dir)
    data.attach(module.tokenizer, module.data_mode)
    return module, data, next(iter(data.train_dataloader()))


def test_kto_module_reference_point_is_kto_kl_estimate_with_the_cross_rank_sum(hh_dir, monkeypatch):
    import lit_align.kto

    module, _, batch = kto_with_batch(hh_dir)
    calls = []

    def spy(policy_logps, reference_logps, sum_across_ranks=None):
        calls.append(sum_across_ranks)
        return kto_kl_estimate(policy_logps, reference_logps, sum_across_ranks=sum_across_ranks)

    monkeypatch.setattr(lit_align.kto, "kto_kl_estimate", spy)
    log_ratios = hand_kl_log_ratios(module, batch)
    assert log_ratios.abs().min() > 1e-3  # the perturbation moved every pair

    # one process: max(0, mean), computed by hand
    z_ref = module.reference_point(batch)
    assert calls == [module.sum_across_ranks]  # the tested function is the one that runs, with the ranks' sum
    assert z_ref.shape == () and not z_ref.requires_grad
    assert float(z_ref) == pytest.approx(max(0.0, float(log_ratios.mean())), abs=1e-5)

    # two ranks (the collective replaced by adding another rank's [Σ, count]): the global mean, then the clamp
    local_sum, n = float(log_ratios.sum()), log_ratios.numel()
    for target in (0.3, -0.3):  # another rank of 3 pairs bringing the global mean to ±0.3
        extra = t([target * (n + 3) - local_sum, 3.0])
        monkeypatch.setattr(module, "sum_across_ranks", lambda local, extra=extra: local + extra.to(local))
        assert float(module.reference_point(batch)) == pytest.approx(max(0.0, target), abs=1e-5)


class HandReferencePoint(L.Callback):
    """Before each training step: the hand-computed mean KL log-ratio of the batch; after it: the module's z_ref."""

    def __init__(self) -> None:
        self.means: list[float] = []
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.means.append(float(hand_kl_log_ratios(module, batch).mean()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seen.append(module.last_reference_point)


def test_kto_last_reference_point_is_the_clamped_mean_of_the_step(hh_dir):
    from helpers import fit

    # the same noise on the policy, then on the reference: the KL log-ratios of the first batch are exact
    # opposites, so one run exercises the positive value and the other the clamp at 0
    runs = {}
    for perturb in ("policy", "reference"):
        module, data, _ = kto_with_batch(hh_dir, perturb)
        record = HandReferencePoint()
        fit(module, data, [record], max_steps=1)
        runs[perturb] = (record.means[0], record.seen[0])
    (mean_a, seen_a), (mean_b, seen_b) = runs.values()
    assert abs(mean_a) > 1e-3 and mean_b == pytest.approx(-mean_a, abs=1e-6)
    for mean, seen in ((mean_a, seen_a), (mean_b, seen_b)):
        if mean > 0:
            assert seen == pytest.approx(mean, abs=1e-5)  # the step's z_ref: the unclamped mean
        else:
            assert seen == 0.0  # clamped


def test_value_clip_fraction_counts_only_values_the_clamp_moved():
    # |V − V_old| = 0.1475 < 0.2: not clipped; but in float32 V_old + (V − V_old) rounds above V, and the clipped error
    # came out one ulp larger than the unclipped one, which counted the token as clipped
    values, old = torch.tensor([0.04245376959443092]), torch.tensor([-0.10505765676498413])
    returns = torch.tensor([0.06752925366163254])
    assert ((old + (values - old)) - returns) ** 2 > (values - returns) ** 2  # the rounding this guards against
    assert clipped_value_loss(values, old, returns, torch.ones(1)).clipfrac == 0.0
    # V = 0.5 from V_old = 0 is clamped to 0.2; toward R = 2 that is worse, (0.2 − 2)² > (0.5 − 2)²: the max takes it
    clipped = clipped_value_loss(torch.tensor([0.5, 0.0]), torch.zeros(2), torch.tensor([2.0, 0.0]), torch.ones(2))
    assert clipped.clipfrac == 0.5
    # toward R = −1 the clamp helps, (0.2 + 1)² < (0.5 + 1)²: the unclipped error is the max, nothing counted
    assert clipped_value_loss(torch.tensor([0.5]), torch.zeros(1), torch.tensor([-1.0]), torch.ones(1)).clipfrac == 0
