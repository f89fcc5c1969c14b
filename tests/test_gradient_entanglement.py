"""Gradient entanglement (Yuan et al. 2024): margin coefficients, the monitor's exact per-pair gradients, and the
pairwise-normalised DPO step, checked against gradients taken independently with ``torch.autograd.grad``."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import fit, hh_pairs

from callbacks import GradientEntanglementMonitor
from datamodules.keys import (
    CHOSEN_ATTENTION_MASK,
    CHOSEN_COMPLETION_MASK,
    CHOSEN_INPUT_IDS,
    REJECTED_ATTENTION_MASK,
    REJECTED_COMPLETION_MASK,
    REJECTED_INPUT_IDS,
)
from lit_align import DPOModule, KTOModule
from lit_align.gradients import entanglement_condition, kto_margin_coefficients, margin_coefficients, margin_loss_slope
from lit_align.losses import kto_loss, preference_loss


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "simpo"])
def test_margin_coefficients_are_the_ratio_of_the_loss_gradients(loss_type):
    torch.manual_seed(0)
    chosen = torch.randn(64, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(64, dtype=torch.float64, requires_grad=True)
    lengths_w, lengths_l = torch.randint(1, 50, (64,)).double(), torch.randint(1, 50, (64,)).double()
    reference = {} if loss_type == "simpo" else {"ref_chosen_logps": chosen * 0, "ref_rejected_logps": rejected * 0}
    smoothing = {"label_smoothing": 0.1} if loss_type in ("robust", "sigmoid") else {}
    out = preference_loss(
        loss_type,
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        chosen_lengths=lengths_w,
        rejected_lengths=lengths_l,
        beta=0.3,
        **reference,
        **smoothing,
    )
    d_chosen, d_rejected = torch.autograd.grad(out.losses.sum(), [chosen, rejected])
    c_w, c_l = margin_coefficients(loss_type, beta=0.3, chosen_lengths=lengths_w, rejected_lengths=lengths_l)
    active = d_rejected.abs() > 1e-12  # the hinge is flat past its margin
    assert active.sum() > 10
    # ∂L/∂log π_w = ℓ'·c_w and ∂L/∂log π_l = −ℓ'·c_l, so −∂L/∂log π_w / ∂L/∂log π_l = c_w / c_l
    torch.testing.assert_close((-d_chosen / d_rejected)[active], (c_w / c_l)[active])
    if loss_type == "sigmoid":  # DPO: ℓ' = −β σ(−βΔ)·(smoothing), so c itself is β
        assert torch.all(c_w == 0.3) and torch.all(c_l == 0.3)


def test_kto_margin_coefficients_are_the_gradients_of_the_two_rows():
    torch.manual_seed(0)
    ratios = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    z, beta = 0.2, 0.5
    desirable = torch.tensor([True, False]).repeat_interleave(32)
    out = kto_loss(ratios.flatten(), torch.zeros(64, dtype=torch.float64), desirable, z, beta, 1.5, 0.7)
    (grad,) = torch.autograd.grad(out.losses.sum(), [ratios])
    c_w, c_l = kto_margin_coefficients(ratios[0], ratios[1], z, beta, 1.5, 0.7)
    torch.testing.assert_close(c_w, -grad[0])
    torch.testing.assert_close(c_l, grad[1])


def test_margin_loss_slope_is_minus_the_loss_derivative_by_hand():
    """−ℓ'(m) per pair, against hand derivatives: IPO ℓ = (m − 1/(2β))² on each side of 1/(2β); cDPO
    ℓ = −(1−ε)·logσ(m) − ε·logσ(−m), ℓ' = σ(m) − (1−ε), on each side of σ(m) = 1−ε; the hinge, flat past m = 1."""
    beta = 0.5  # IPO target 1/(2β) = 1
    lengths_w, lengths_l = torch.tensor([2.0, 2.0]), torch.tensor([4.0, 4.0])
    zeros = torch.zeros(2, dtype=torch.float64)
    # m = Δ_w/|y_w| − Δ_l/|y_l| with Δ_l = 0: m = 0.4 (below the target) and m = 1.6 (past it)
    chosen = torch.tensor([0.8, 3.2], dtype=torch.float64)
    common = dict(policy_rejected_logps=zeros, ref_chosen_logps=zeros, ref_rejected_logps=zeros,
                  chosen_lengths=lengths_w, rejected_lengths=lengths_l, beta=beta)  # fmt: skip
    ipo = margin_loss_slope("ipo", policy_chosen_logps=chosen, **common)
    torch.testing.assert_close(ipo, torch.tensor([-2 * (0.4 - 1.0), -2 * (1.6 - 1.0)], dtype=torch.float64))
    # cDPO, ε = 0.2: m = β·Δ = 0 → σ = 0.5 < 0.8 (widens); m = 3 → σ(3) = 0.9526 > 0.8 (narrows)
    chosen = torch.tensor([0.0, 6.0], dtype=torch.float64)
    cdpo = margin_loss_slope("sigmoid", policy_chosen_logps=chosen, label_smoothing=0.2, **common)
    sigma_3 = 1 / (1 + math.exp(-3.0))
    torch.testing.assert_close(cdpo, torch.tensor([0.8 - 0.5, 0.8 - sigma_3], dtype=torch.float64))
    assert cdpo[0] > 0 > cdpo[1]
    # hinge relu(1 − m): slope 1 at m = β·Δ = 0.5, 0 at m = 2
    chosen = torch.tensor([1.0, 4.0], dtype=torch.float64)
    hinge = margin_loss_slope("hinge", policy_chosen_logps=chosen, **common)
    torch.testing.assert_close(hinge, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_entanglement_condition_follows_the_sign_of_the_loss_derivative():
    """One geometry, three slopes: with −ℓ' > 0 the pair moves as intended, with −ℓ' < 0 (IPO past 1/(2β)) both moves
    flip, with ℓ' = 0 nothing moves; the summary's ``condition_failed`` counts moves against the loss's intent only."""
    from callbacks.gradient_entanglement import entanglement_summary

    # ⟨g_w,g_l⟩ = 0.5, ‖g_w‖² = 2, ‖g_l‖² = 1, c = 1: Δlog π_w ∝ s·(2 − 0.5), Δlog π_l ∝ s·(0.5 − 1)
    geometry = {
        "inner": torch.full((3,), 0.5, dtype=torch.float64),
        "chosen_norm_sq": torch.full((3,), 2.0, dtype=torch.float64),
        "rejected_norm_sq": torch.full((3,), 1.0, dtype=torch.float64),
        "chosen_logps": torch.zeros(3, dtype=torch.float64),
        "rejected_logps": torch.zeros(3, dtype=torch.float64),
    }
    ones = torch.ones(3)
    slopes = torch.tensor([1.2, -1.2, 0.0])  # IPO at m = 0.4 and m = 1.6 with target 1 (above), a flat hinge
    falls, rises = entanglement_condition(
        geometry["inner"], geometry["chosen_norm_sq"], geometry["rejected_norm_sq"], ones, ones, slopes
    )
    assert falls.tolist() == [False, True, False] and rises.tolist() == [False, True, False]
    summary = entanglement_summary(geometry, ones, ones, slopes)
    assert summary["chosen_falls"] == pytest.approx(1 / 3) and summary["rejected_rises"] == pytest.approx(1 / 3)
    assert summary["margin_narrowing"] == pytest.approx(1 / 3)
    assert summary["condition_failed"] == 0.0  # every move is the one its loss asks for
    # an entangled geometry, ‖g_l‖² = 1 < ⟨g_w,g_l⟩ = 1.8 < ‖g_w‖² = 4: both log-probs move with the chosen one, so
    # the rejected moves against the loss's intent whichever way it pushes the margin
    entangled = {**geometry, "inner": torch.full((3,), 1.8, dtype=torch.float64)}
    entangled["chosen_norm_sq"] = torch.full((3,), 4.0, dtype=torch.float64)
    summary = entanglement_summary(entangled, ones, ones, slopes)
    assert summary["condition_failed"] == pytest.approx(2 / 3)  # not the flat pair
    assert summary["chosen_falls"] == pytest.approx(1 / 3)  # s < 0: −1.2·(4 − 1.8) < 0, as the loss asks
    assert summary["rejected_rises"] == pytest.approx(1 / 3)  # s > 0: 1.2·(1.8 − 1) > 0, against the loss


# ---- the monitor ---------------------------------------------------------------------------------------------


pairs = partial(hh_pairs, max_length=48, max_prompt_length=32)  # 8 training pairs in batches of 4, 4 held out


def sequence_gradients(module, batch, row: int, keys) -> tuple[torch.Tensor, torch.Tensor]:
    """log π and its flat gradient over every trainable parameter for one padded sequence, by autograd.grad."""
    ids, attention, completion = (batch[key][row : row + 1] for key in keys)
    logits = module.policy(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]
    logp = (token_logps * completion[:, 1:]).sum()
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logp, params, allow_unused=True)
    flat = torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )
    return logp.detach(), flat.double()


CHOSEN = (CHOSEN_INPUT_IDS, CHOSEN_ATTENTION_MASK, CHOSEN_COMPLETION_MASK)
REJECTED = (REJECTED_INPUT_IDS, REJECTED_ATTENTION_MASK, REJECTED_COMPLETION_MASK)


def test_monitor_inner_products_equal_autograd_per_sequence_and_leave_training_unchanged(hh_dir, tmp_path):
    torch.manual_seed(0)
    monitored = DPOModule(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant", loss_type="simpo")
    monitor = GradientEntanglementMonitor(every_n_steps=2, num_pairs=4, output_dir=str(tmp_path))
    data = pairs(hh_dir)
    fit(monitored, data, [monitor], max_steps=4)
    torch.manual_seed(0)
    plain = DPOModule(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant", loss_type="simpo")
    fit(plain, pairs(hh_dir), [], max_steps=4)
    for (name, a), b in zip(monitored.policy.state_dict().items(), plain.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # measuring set the training gradients aside and restored them

    assert [entry["step"] for entry in monitor.history] == [0, 2, 4]
    probe = data.probe_batch("val", "pair", 4)
    assert probe[CHOSEN_INPUT_IDS].shape[0] == 4
    expected = {k: [] for k in ("inner", "chosen", "rejected", "cos", "logp_w", "logp_l", "falls", "rises")}
    for row in range(4):
        logp_w, g_w = sequence_gradients(monitored, probe, row, CHOSEN)
        logp_l, g_l = sequence_gradients(monitored, probe, row, REJECTED)
        inner, n_w, n_l = g_w @ g_l, g_w @ g_w, g_l @ g_l
        # SimPO: c = β/|y|, so the chosen falls when ⟨g_w,g_l⟩/|y_l| > ‖g_w‖²/|y_w|
        length_w, length_l = probe[CHOSEN_COMPLETION_MASK][row].sum(), probe[REJECTED_COMPLETION_MASK][row].sum()
        for key, value in zip(
            expected,
            (
                inner,
                n_w,
                n_l,
                inner / (n_w * n_l).sqrt(),
                logp_w,
                logp_l,
                inner / length_l > n_w / length_w,
                inner / length_w > n_l / length_l,
            ),
            strict=True,
        ):
            expected[key].append(float(value))
    last = monitor.history[-1]
    mean = {k: sum(v) / len(v) for k, v in expected.items()}
    assert last["inner"] == pytest.approx(mean["inner"], rel=1e-4)
    assert last["norm_sq_chosen"] == pytest.approx(mean["chosen"], rel=1e-4)
    assert last["norm_sq_rejected"] == pytest.approx(mean["rejected"], rel=1e-4)
    assert last["cosine"] == pytest.approx(mean["cos"], rel=1e-4)
    assert last["logps_chosen"] == pytest.approx(mean["logp_w"], rel=1e-5)
    assert last["logps_rejected"] == pytest.approx(mean["logp_l"], rel=1e-5)
    assert last["chosen_falls"] == mean["falls"] and last["rejected_rises"] == mean["rises"]
    ratio_w = sum(i / n for i, n in zip(expected["inner"], expected["chosen"], strict=True)) / 4
    assert last["ratio_chosen"] == pytest.approx(ratio_w, rel=1e-4)
    assert abs(last["inner"]) > 1e-3  # not a vacuous comparison of zeros

    history = json.loads((tmp_path / "gradient_entanglement.json").read_text())
    assert [entry["step"] for entry in history] == [0, 2, 4]
    assert (tmp_path / "gradient_entanglement.png").stat().st_size > 10_000


def test_monitor_restricted_to_a_parameter_subset(hh_dir, tmp_path):
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant")
    monitor = GradientEntanglementMonitor(every_n_steps=1, num_pairs=2, parameters=r"layers\.0\.mlp\.", plot=False)
    data = pairs(hh_dir)
    fit(module, data, [monitor], max_steps=1, default_root_dir=tmp_path)
    probe = data.probe_batch("val", "pair", 2)
    subset = [p for name, p in module.named_parameters() if "layers.0.mlp." in name and p.requires_grad]
    assert len(subset) == 3  # gate, up and down projections of the first block
    expected = []
    for row in range(2):
        grads = []
        for keys in (CHOSEN, REJECTED):
            ids, attention, completion = (probe[key][row : row + 1] for key in keys)
            logp = module.policy_logprobs(ids, attention, completion).logps.sum()
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(logp, subset)]).double())
        expected.append(float(grads[0] @ grads[1]))
    assert monitor.history[-1]["inner"] == pytest.approx(sum(expected) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="matches no trainable"):
        GradientEntanglementMonitor(parameters="no_such_layer").selected_parameters(module)


def test_monitor_with_kto_reads_pairs_from_an_unpaired_datamodule(hh_dir):
    torch.manual_seed(0)
    module = KTOModule(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant")
    monitor = GradientEntanglementMonitor(every_n_steps=1, num_pairs=3, plot=False)
    data = pairs(hh_dir)
    fit(module, data, [monitor], max_steps=2)
    assert data.data_mode == "unpaired"
    probe = data.probe_batch("val", "pair", 3)
    records = data.dataset("val").records  # unpaired rows: each pair's chosen and rejected, shuffled
    texts = {(r["prompt"], r["completion"], r["label"]) for r in records}
    for prompt, chosen, rejected in zip(probe["prompt"], probe["chosen"], probe["rejected"], strict=True):
        assert (prompt, chosen, True) in texts and (prompt, rejected, False) in texts
    # KTO's coefficients by hand at the stored z_ref, from log-probs and gradients taken independently:
    # c_w = λ_D·β·σ(x_w)·σ(−x_w), x_w = β·(r_w − z); c_l = λ_U·β·σ(x_l)·σ(−x_l), x_l = β·(z − r_l), r = log π/π_ref
    # (the stored z_ref itself is pinned in test_losses.py, test_kto_last_reference_point_is_the_clamped_mean...)
    beta, z = module.hparams.beta, float(module.last_reference_point)
    expected = {"ratio": [], "falls": [], "rises": []}
    for row in range(3):
        logp_w, g_w = sequence_gradients(module, probe, row, CHOSEN)
        logp_l, g_l = sequence_gradients(module, probe, row, REJECTED)
        x_w = beta * (float(logp_w) - float(sequence_logp(module.reference, probe, row, CHOSEN)) - z)
        x_l = beta * (z - float(logp_l) + float(sequence_logp(module.reference, probe, row, REJECTED)))
        c_w = beta * math.exp(-x_w) / (1 + math.exp(-x_w)) ** 2  # β·σ(x)·σ(−x), λ = 1
        c_l = beta * math.exp(-x_l) / (1 + math.exp(-x_l)) ** 2
        inner, n_w, n_l = float(g_w @ g_l), float(g_w @ g_w), float(g_l @ g_l)
        expected["ratio"].append(c_w / c_l)
        expected["falls"].append(c_l * inner > c_w * n_w)  # KTO always pushes y_w up and y_l down: slope 1
        expected["rises"].append(c_w * inner > c_l * n_l)
    mean = {key: sum(values) / 3 for key, values in expected.items()}
    last = monitor.history[-1]
    assert last["coefficient_ratio"] == pytest.approx(mean["ratio"], rel=1e-4)
    assert abs(mean["ratio"] - 1) > 1e-3  # not the trivial ratio
    assert last["chosen_falls"] == mean["falls"] and last["rejected_rises"] == mean["rises"]
    assert last["margin_narrowing"] == 0.0


def sequence_logp(model: torch.nn.Module, batch, row: int, keys) -> torch.Tensor:
    """log model(y|x) of one padded sequence, without gradient (the summed completion-token log-probs, float64)."""
    ids, attention, completion = (batch[key][row : row + 1] for key in keys)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double()
    token_logps = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]
    return (token_logps * completion[:, 1:]).sum()


@pytest.mark.parametrize(
    "loss_type, beta, smoothing", [("ipo", 25.0, 0.0), ("sigmoid", 10.0, 0.1)], ids=["ipo", "cdpo"]
)
def test_monitor_directions_follow_the_sign_of_the_loss_derivative(hh_dir, tmp_path, loss_type, beta, smoothing):
    """Issue 13: the monitor assumed −ℓ' > 0, so for IPO past 1/(2β) and cDPO once σ(m) > 1−ε it reported the chosen
    falling when it rises and the reverse. With a reference unlike the policy and each probe pair also swapped
    (margins m and −m), half the pairs sit on each side; the monitor's directions must equal the hand-computed
    −ℓ'(m)·(c_w‖g_w‖² − c_l⟨g_w,g_l⟩) etc., with gradients and log-probs taken independently."""
    from lit_align.models import tiny_llama

    reference_dir = tmp_path / "reference"
    tiny_llama(seed=1).save_pretrained(reference_dir)
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", reference_model=str(reference_dir), loss_type=loss_type, beta=beta,
                       label_smoothing=smoothing, learning_rate=1e-3, lr_scheduler="constant")  # fmt: skip
    monitor = GradientEntanglementMonitor(every_n_steps=1, num_pairs=2, plot=False)
    data = pairs(hh_dir)
    trainer = fit(module, data, [monitor], max_steps=1)
    probe = data.probe_batch("val", "pair", 2)
    both = {}  # the two pairs, then the same two with chosen and rejected swapped
    for chosen_key, rejected_key in zip(CHOSEN, REJECTED, strict=True):
        both[chosen_key] = torch.cat([probe[chosen_key], probe[rejected_key]])
        both[rejected_key] = torch.cat([probe[rejected_key], probe[chosen_key]])
    monitor.probe = both
    entry = monitor.measure(trainer, module)

    expected = {"falls": [], "rises": [], "narrowing": [], "falls_if_widening": [], "rises_if_widening": []}
    for row in range(4):
        logp_w, g_w = sequence_gradients(module, both, row, CHOSEN)
        logp_l, g_l = sequence_gradients(module, both, row, REJECTED)
        ratio_w = float(logp_w) - float(sequence_logp(module.reference, both, row, CHOSEN))
        ratio_l = float(logp_l) - float(sequence_logp(module.reference, both, row, REJECTED))
        inner, n_w, n_l = float(g_w @ g_l), float(g_w @ g_w), float(g_l @ g_l)
        if loss_type == "ipo":  # m = Δ_w/|y_w| − Δ_l/|y_l|, ℓ'(m) = 2(m − 1/(2β)), c = 1/|y|
            length_w, length_l = (float(both[key][row].sum()) for key in (CHOSEN[2], REJECTED[2]))
            margin = ratio_w / length_w - ratio_l / length_l
            derivative, c_w, c_l = 2 * (margin - 1 / (2 * beta)), 1 / length_w, 1 / length_l
        else:  # cDPO: m = β(Δ_w − Δ_l), ℓ'(m) = σ(m) − (1 − ε), c = β
            margin = beta * (ratio_w - ratio_l)
            derivative, c_w, c_l = 1 / (1 + math.exp(-margin)) - (1 - smoothing), beta, beta
        chosen_change, rejected_change = c_w * n_w - c_l * inner, c_w * inner - c_l * n_l  # × −ℓ'
        expected["falls"].append(-derivative * chosen_change < 0)
        expected["rises"].append(-derivative * rejected_change > 0)
        expected["narrowing"].append(derivative > 0)
        expected["falls_if_widening"].append(chosen_change < 0)
        expected["rises_if_widening"].append(rejected_change > 0)
    mean = {key: sum(values) / 4 for key, values in expected.items()}
    assert mean["narrowing"] == 0.5  # both regimes are present: each pair or its swap narrows
    assert entry["margin_narrowing"] == 0.5
    assert entry["chosen_falls"] == mean["falls"] and entry["rejected_rises"] == mean["rises"]
    # what the monitor reported before (−ℓ' assumed > 0) differs here, so the test tells the two apart
    assert (mean["falls"], mean["rises"]) != (mean["falls_if_widening"], mean["rises_if_widening"])


def test_monitor_refuses_modules_without_margin_coefficients(hh_dir):
    from lit_align import SFTModule

    with pytest.raises(TypeError, match="margin-based module"):
        fit(SFTModule(model="tiny-llama"), pairs(hh_dir), [GradientEntanglementMonitor()], max_steps=1)


# ---- the normalised step ----------------------------------------------------------------------------------------


def test_normalized_step_is_the_pairwise_normalized_direction(hh_dir):
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", beta=0.5, normalize_pair_gradients=True)
    module.configure_model()
    data = pairs(hh_dir, batch_size=2)
    data.attach(module.tokenizer, "pair")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.log_values = lambda *args, **kwargs: None  # no trainer here; logging is tested elsewhere
    module.shared_step(batch, "train").backward()
    params = [p for p in module.parameters() if p.requires_grad]
    got = torch.cat([p.grad.flatten() for p in params]).double()

    expected = torch.zeros_like(got)
    for row in range(2):
        logp_w, g_w = sequence_gradients(module, batch, row, CHOSEN)
        logp_l, g_l = sequence_gradients(module, batch, row, REJECTED)
        with torch.no_grad():
            ref_w = module.reference_logprobs(*(batch[k][row : row + 1] for k in CHOSEN)).logps.sum()
            ref_l = module.reference_logprobs(*(batch[k][row : row + 1] for k in REJECTED)).logps.sum()
        delta = (logp_w - ref_w) - (logp_l - ref_l)
        scale = 0.5 * torch.sigmoid(-0.5 * delta)  # DPO: −∂L/∂log π_w = ∂L/∂log π_l = β σ(−βΔ)
        expected += -scale.double() * (g_w / g_w.norm() - g_l / g_l.norm()) / 2  # mean over the 2 pairs
    assert (got - expected).norm() < 1e-4 * expected.norm()  # float32 sums vs float64: elementwise noise ~1e-8


def apply_module_step(module: DPOModule, batch: dict, target_change: float) -> tuple[float, float]:
    """One plain gradient step with the module's own gradient, sized so the larger predicted first-order log-prob
    change is ``target_change``; returns the real changes (Δ log π_w, Δ log π_l)."""
    params = [p for p in module.parameters() if p.requires_grad]
    before = [module.policy_logprobs(*(batch[k] for k in side)).logps.item() for side in (CHOSEN, REJECTED)]
    for p in params:
        p.grad = None
    module.shared_step(batch, "train").backward()
    step = [p.grad.clone() for p in params]
    predicted = []
    for side in (CHOSEN, REJECTED):  # first order: Δ log π = −η ⟨∇ log π, ∇L⟩
        logp = module.policy_logprobs(*(batch[k] for k in side)).logps.sum()
        grads = torch.autograd.grad(logp, params)
        predicted.append(-sum(float((g * s).sum()) for g, s in zip(grads, step, strict=True)))
    rate = target_change / max(abs(v) for v in predicted)
    with torch.no_grad():
        for p, s in zip(params, step, strict=True):
            p -= rate * s
    after = [module.policy_logprobs(*(batch[k] for k in side)).logps.item() for side in (CHOSEN, REJECTED)]
    return after[0] - before[0], after[1] - before[1]


def test_dpo_lowers_both_log_probs_of_an_entangled_pair_and_the_normalized_step_raises_the_chosen():
    from datamodules.collation import Collator

    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 40000, (5,), generator=generator).tolist()
    chosen = torch.randint(100, 40000, (3,), generator=generator).tolist()
    rejected = chosen * 3  # shares every chosen token: the two gradients are strongly aligned
    item = {"index": 0, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
    item.update(prompt="", chosen="", rejected="")
    batch = Collator("pair", pad_id=0, max_length=64)([item])
    changes = {}
    for normalize in (False, True):
        torch.manual_seed(0)
        module = DPOModule(model="tiny-llama", beta=0.1, normalize_pair_gradients=normalize)
        module.configure_model()
        module.log_values = lambda *args, **kwargs: None
        if not normalize:  # the precondition, measured independently: ‖g_w‖² < ⟨g_w,g_l⟩ < ‖g_l‖²
            _, g_w = sequence_gradients(module, batch, 0, CHOSEN)
            _, g_l = sequence_gradients(module, batch, 0, REJECTED)
            assert g_w @ g_w < g_w @ g_l < g_l @ g_l
        changes[normalize] = apply_module_step(module, batch, target_change=0.01)
    dpo_chosen, dpo_rejected = changes[False]
    assert dpo_chosen < 0 and dpo_rejected < 0, changes  # DPO widens the margin by lowering both
    normalized_chosen, normalized_rejected = changes[True]
    assert normalized_chosen > 0 and normalized_rejected < 0, changes
