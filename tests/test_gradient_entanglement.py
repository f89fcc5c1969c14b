"""Gradient entanglement (Yuan et al. 2024): margin coefficients, the monitor's exact per-pair gradients, and the
pairwise-normalised DPO step, checked against gradients taken independently with ``torch.autograd.grad``."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import fit, hh_pairs

from callbacks import GradientEntanglementMonitor
from datamodules.base import (
    CHOSEN_ATTENTION_MASK,
    CHOSEN_COMPLETION_MASK,
    CHOSEN_INPUT_IDS,
    REJECTED_ATTENTION_MASK,
    REJECTED_COMPLETION_MASK,
    REJECTED_INPUT_IDS,
)
from lit_align import DPOModule, KTOModule
from lit_align.gradients import kto_margin_coefficients, margin_coefficients
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
    # KTO's coefficients at the stored z_ref (checked against kto_loss's gradients above) drive the condition
    c_w, c_l = module.pair_margin_coefficients(probe)
    assert monitor.history[-1]["coefficient_ratio"] == pytest.approx(float((c_w / c_l).mean()), rel=1e-5)
    # the stored z_ref itself is pinned in test_losses.py (test_kto_last_reference_point_is_the_clamped_mean...)


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
    from datamodules.base import Collator

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
