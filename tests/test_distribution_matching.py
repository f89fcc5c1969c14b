"""Distribution matching on an exactly enumerable toy LM: a 2-layer Llama over 6 tokens with 3 new tokens, so every
completion (156 of them) and its exact probability is known. λ fitting against the exact solution, the exact
KL(p‖π) falling under KL-DPG and GDC++, GDC++'s lower gradient variance, the proposal-update rule and its
effective-sample-size guard, the Ẑ-normalised loss beyond float range (a KL-control target with log P − log q > 100)
against a float64 reference, and the estimators and diversity metrics against hand values."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from helpers import fit
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from datamodules import ControlledGenerationDataModule
from lit_align import DistributionMatchingModule, SamplingSettings
from lit_align.ebm import (
    DistributionalConstraint,
    FemalePronounFeature,
    KLControlTarget,
    PointwiseConstraint,
    WordFeature,
    effective_sample_size,
    fit_lambdas,
    importance_kl,
    importance_tvd,
)
from lit_align.losses import dpg_loss
from lit_align.metrics import distinct_n, self_bleu
from lit_align.models import tiny_llama
from lit_align.rewards import CallableReward

VOCAB = {"<s>": 0, "a": 1, "b": 2, "c": 3, "amazing": 4, "[UNK]": 5}
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def toy_lm(tmp_path_factory):
    """A real HF tokenizer (word level) and a seeded tiny Llama over its 6 tokens, saved as a model directory."""
    directory = tmp_path_factory.mktemp("toy_lm")
    backend = Tokenizer(WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<s>", pad_token="<s>", unk_token="[UNK]"
    )
    tokenizer.save_pretrained(directory)
    tiny_llama(seed=3, vocab_size=len(VOCAB), bos_token_id=0, eos_token_id=0, pad_token_id=0).save_pretrained(directory)
    return str(directory)


def all_completions() -> list[list[int]]:
    """Every response: k < 3 non-EOS tokens then EOS, or 3 non-EOS tokens."""
    tokens = [t for t in VOCAB.values() if t != 0]
    ended = [[*prefix, 0] for k in range(NEW_TOKENS) for prefix in itertools.product(tokens, repeat=k)]
    return ended + [list(full) for full in itertools.product(tokens, repeat=NEW_TOKENS)]


@torch.no_grad()
def exact_logprobs(model: torch.nn.Module, completions: list[list[int]]) -> torch.Tensor:
    """log model(x | <s>) of each completion, by a plain forward and log-softmax."""
    width = 1 + NEW_TOKENS
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    mask = torch.zeros(len(completions), NEW_TOKENS)
    for row, completion in enumerate(completions):
        ids[row, 1 : 1 + len(completion)] = torch.tensor(completion)
        mask[row, : len(completion)] = 1
    logprobs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)
    picked = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (picked * mask).sum(-1)


def contains_amazing(completions: list[list[int]]) -> torch.Tensor:
    return torch.tensor([float(VOCAB["amazing"] in c) for c in completions], dtype=torch.float64)


def exact_kl_p_pi(log_a: torch.Tensor, b: torch.Tensor, log_pi: torch.Tensor) -> float:
    p = torch.exp(log_a) * b
    p = p / p.sum()
    support = p > 0
    return float((p[support] * (torch.log(p[support]) - log_pi[support])).sum())


def toy_data(num_train: int, batch_size: int) -> ControlledGenerationDataModule:
    return ControlledGenerationDataModule(num_train=num_train, num_val=0, batch_size=batch_size, seed=0)


def towards_amazing(toy_lm: str, **overrides) -> DistributionMatchingModule:
    """Distribution matching of the toy LM towards its completions that contain "amazing" (a constant learning
    rate, 3 new tokens)."""
    settings = dict(sampling=SamplingSettings(max_new_tokens=NEW_TOKENS), lr_scheduler="constant")
    settings.update(overrides)
    return DistributionMatchingModule(
        PointwiseConstraint({"amazing": WordFeature("amazing")}), model=toy_lm, **settings
    )


def test_the_toy_enumeration_is_a_distribution(toy_lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_lm)
    assert len(all_completions()) == 1 + 5 + 25 + 125
    assert math.isclose(float(torch.exp(exact_logprobs(model, all_completions())).sum()), 1.0, abs_tol=1e-9)


# ---- λ fitting ----------------------------------------------------------------------------------------------------


def exact_lambda(log_a: torch.Tensor, phi: torch.Tensor, target: float) -> float:
    """Solve E_{p_λ}[φ] = target for p_λ ∝ a·exp(λφ) by bisection over the enumerated support."""
    low, high = -20.0, 20.0
    for _ in range(200):
        middle = (low + high) / 2
        weights = torch.softmax(log_a + middle * phi, dim=0)
        low, high = (middle, high) if float(weights @ phi) < target else (low, middle)
    return (low + high) / 2


def count_a(text: str) -> float:
    return float(text.split().count("a"))


def test_fit_lambdas_on_the_full_support_matches_the_exact_solution(toy_lm):
    from transformers import AutoModelForCausalLM

    completions = all_completions()
    log_a = exact_logprobs(AutoModelForCausalLM.from_pretrained(toy_lm), completions)
    phi = torch.tensor([[float(c.count(VOCAB["a"]))] for c in completions], dtype=torch.float64)
    target = float(torch.exp(log_a) @ phi[:, 0]) + 0.4
    # every completion once, weighted by a(x)/uniform: the SNIS moments are exact expectations
    fit = fit_lambdas(phi, torch.tensor([target]), log_a, tolerance=1e-8, max_iterations=10_000)
    assert fit.converged
    assert float(fit.lambdas[0]) == pytest.approx(exact_lambda(log_a, phi[:, 0], target), abs=1e-5)


def test_the_module_fits_lambda_from_samples_of_a(toy_lm):
    from transformers import AutoModelForCausalLM

    completions = all_completions()
    log_a = exact_logprobs(AutoModelForCausalLM.from_pretrained(toy_lm), completions)
    phi = torch.tensor([float(c.count(VOCAB["a"])) for c in completions], dtype=torch.float64)
    target_moment = float(torch.exp(log_a) @ phi) + 0.4
    target = DistributionalConstraint({"a_count": count_a}, moments=[target_moment], tolerance=1e-6)
    module = DistributionMatchingModule(
        target=target,
        model=toy_lm,
        sampling={"max_new_tokens": NEW_TOKENS},
        moment_matching_samples=8192,
        learning_rate=1e-12,  # the test is about λ; learning_rate must be > 0
    )
    torch.manual_seed(0)
    fit(module, toy_data(num_train=1024, batch_size=512), max_steps=1)
    exact = exact_lambda(log_a, phi, target_moment)
    assert float(target.lambdas[0]) == pytest.approx(exact, abs=0.06)  # SNIS error with 8192 samples
    assert bool(target.fitted)


def test_fit_lambdas_refuses_unreachable_moments():
    phi = torch.tensor([[0.0], [1.0], [1.0]])
    with pytest.raises(ValueError, match="outside the sampled values' range"):
        fit_lambdas(phi, torch.tensor([1.5]), torch.zeros(3))


# ---- learning and variance ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", [False, True], ids=["kl_dpg", "gdc_pp"])
def test_dpg_reduces_the_exact_kl_to_the_target(toy_lm, baseline):
    from transformers import AutoModelForCausalLM

    completions = all_completions()
    b = contains_amazing(completions)
    log_a = exact_logprobs(AutoModelForCausalLM.from_pretrained(toy_lm), completions)
    start = exact_kl_p_pi(log_a, b, log_a)
    torch.manual_seed(0)
    module = towards_amazing(toy_lm, baseline=baseline, proposal_update_every=5, learning_rate=3e-3)
    trainer = fit(module, toy_data(num_train=40 * 64, batch_size=64), max_steps=40)
    end = exact_kl_p_pi(log_a, b, exact_logprobs(module.policy, completions))
    assert end < 0.5 * start, (start, end)
    assert int(module.proposal_updates) >= 1
    # the last check's ESS is logged: 320 samples, ~1/3 of them satisfy the constraint (Z = 0.32 under a)
    assert 10 < float(trainer.callback_metrics["dpg/ess"]) <= 320
    assert int(module.proposal_checks_skipped) == 0


def test_the_gdc_pp_baseline_lowers_gradient_variance_at_equal_samples(toy_lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_lm)
    completions = all_completions()
    log_a = exact_logprobs(model, completions)
    b = contains_amazing(completions)
    z = float((torch.exp(log_a) * b).sum())
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(torch.exp(log_a), 256, replacement=True, generator=generator)
    variances = {}
    for baseline in (False, True):
        gradients = []
        for index in samples.tolist():
            log_pi = exact_logprobs_with_grad(model, completions[index])
            log_target = log_a[index] + torch.log(b[index])
            loss, _ = dpg_loss(log_pi, log_target, log_a[index], log_z=math.log(z), baseline=baseline)
            grads = torch.autograd.grad(loss.sum(), list(model.parameters()))
            gradients.append(torch.cat([g.reshape(-1) for g in grads]).double())
        stacked = torch.stack(gradients)
        variances[baseline] = float(stacked.pow(2).sum(-1).mean() - stacked.mean(0).pow(2).sum())
    assert variances[True] < 0.8 * variances[False], variances


def exact_logprobs_with_grad(model: torch.nn.Module, completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([[0, *completion]])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)
    return logprobs.gather(-1, ids[:, 1:, None]).sum().reshape(1)


# ---- the proposal update ---------------------------------------------------------------------------------------


def test_the_proposal_is_replaced_only_when_the_kl_estimate_improves(toy_lm):
    torch.manual_seed(0)
    module = towards_amazing(toy_lm, proposal_update_every=10_000, learning_rate=3e-3)  # no automatic check in fit
    fit(module, toy_data(num_train=30 * 64, batch_size=64), max_steps=30)
    trained = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    data = toy_data(num_train=256, batch_size=256).attach(module.tokenizer, "prompt")
    data.setup("fit")
    batch = next(iter(data.dataloader("train")))

    def check(policy_weights: dict[str, torch.Tensor]) -> bool:
        """Run the module's check on 256 samples of q with π = ``policy_weights``; assert q afterwards is π's weights
        exactly when the test's own estimate says KL(p‖π) < KL(p‖q), else unchanged; return that expectation."""
        with torch.no_grad():
            for name, parameter in module.policy.named_parameters():
                parameter.copy_(policy_weights[name])
            sequences, attention, response_mask, width, completions = module.sample(module.proposal, batch)
            log_q = module.sequence_logprobs_of(module.proposal, sequences, attention, width, response_mask).double()
            log_a = module.reference_sequence_logprobs(sequences, attention, width, response_mask).double()
            log_pi = module.sequence_logprobs_of(module.policy, sequences, attention, width, response_mask).double()
        b = torch.tensor([float("amazing" in c.split()) for c in completions], dtype=torch.float64)
        log_target = log_a + torch.log(b)
        weights = torch.exp(log_target - log_q)
        z = float(torch.exp(module.log_z))
        ours = {
            name: float(-math.log(z) + (weights * torch.where(b > 0, log_target - other, 0.0)).mean() / z)
            for name, other in (("pi", log_pi), ("q", log_q))
        }
        module.window = [
            {"sequences": sequences, "attention_mask": attention, "response_mask": response_mask,
             "width": torch.tensor(width), "log_target": log_target, "log_q": log_q}
        ]  # fmt: skip
        proposal_before = {n: p.detach().clone() for n, p in module.proposal.named_parameters()}
        expected = ours["pi"] < ours["q"]
        assert module.maybe_update_proposal() == expected
        # q is still a here, so the weights P/q are b ∈ {0, 1}: the ESS is the number of samples with "amazing"
        assert module.last_check_ess == pytest.approx(float(b.sum()))
        assert float(b.sum()) >= module.hparams.min_proposal_ess  # a healthy window: the check is made
        now = dict(module.proposal.named_parameters())
        assert all(torch.equal(now[n], (policy_weights if expected else proposal_before)[n]) for n in now)
        return expected

    random_policy = {n: torch.randn_like(p) * 0.5 for n, p in trained.items()}
    assert not check(random_policy)  # rejected: q unchanged
    assert check(trained)  # accepted: q ← π
    assert int(module.proposal_updates) == 1 and int(module.proposal_checks_skipped) == 0


def test_the_proposal_is_checked_after_every_nth_optimizer_step(toy_lm):
    """Checks follow steps N, 2N, ... (they followed steps 1, N+1, ...: the first on one batch after one step)."""
    module = towards_amazing(toy_lm, proposal_update_every=3, learning_rate=3e-3)
    checked_after, check = [], module.maybe_update_proposal
    module.maybe_update_proposal = lambda: checked_after.append(module.trainer.global_step + 1) or check()
    torch.manual_seed(0)
    fit(module, toy_data(num_train=7 * 8, batch_size=8), max_steps=7)
    assert checked_after == [3, 6]


def test_the_proposal_check_is_skipped_below_the_minimum_effective_sample_size(toy_lm):
    """Issue 13: with a single sample of p in the window (ESS = 1) the importance-sampled KL estimates rest on one
    sample — here they come out in π's favour and the unguarded check replaced q by π. Below ``min_proposal_ess``
    the check is skipped and counted, and q is kept."""
    with pytest.raises(ValueError, match="min_proposal_ess"):
        towards_amazing(toy_lm, min_proposal_ess=-1)
    torch.manual_seed(0)
    module = towards_amazing(toy_lm, proposal_update_every=10_000, learning_rate=3e-3)
    fit(module, toy_data(num_train=5 * 64, batch_size=64), max_steps=5)
    data = toy_data(num_train=64, batch_size=64).attach(module.tokenizer, "prompt")
    data.setup("fit")
    batch = next(iter(data.dataloader("train")))
    with torch.no_grad():
        sequences, attention, response_mask, width, _ = module.sample(module.proposal, batch)
        log_q = module.sequence_logprobs_of(module.proposal, sequences, attention, width, response_mask).double()
        log_pi = module.sequence_logprobs_of(module.policy, sequences, attention, width, response_mask).double()
    best = int(torch.argmax(log_pi - log_q))
    assert log_pi[best] > log_q[best]
    log_target = torch.full_like(log_q, -math.inf)
    log_target[best] = log_q[best]  # P/q = 1 on one sample, 0 on the 63 others
    log_z = module.log_z
    # the unguarded "kld" criterion would accept: KL(p‖π) < KL(p‖q) on this window
    assert importance_kl(log_target, log_q, log_pi, log_z) < importance_kl(log_target, log_q, log_q, log_z)
    module.window = [
        {"sequences": sequences, "attention_mask": attention, "response_mask": response_mask,
         "width": torch.tensor(width), "log_target": log_target, "log_q": log_q}
    ]  # fmt: skip
    proposal_before = {n: p.detach().clone() for n, p in module.proposal.named_parameters()}
    assert not module.maybe_update_proposal()
    assert module.last_check_ess == pytest.approx(1.0)
    assert int(module.proposal_checks_skipped) == 1 and int(module.proposal_updates) == 0
    assert all(torch.equal(p, proposal_before[n]) for n, p in module.proposal.named_parameters())


def test_effective_sample_size_hand_values():
    def ess(weights) -> float:
        return float(effective_sample_size(torch.log(torch.tensor(weights, dtype=torch.float64))))

    assert ess([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert ess([3.0, 0.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert ess([2.0, 1.0, 1.0]) == pytest.approx(16 / 6)  # (2+1+1)² / (4+1+1)
    assert ess([0.0, 0.0]) == 0.0
    # any scale, including weights exp(1000) that no float can hold
    huge = torch.tensor([1000.0, 1000.0, 1000.0 + math.log(2)], dtype=torch.float64)
    assert float(effective_sample_size(huge)) == pytest.approx(16 / 6)


# ---- beyond the float range: KL-control targets far from q ---------------------------------------------------


def test_dpg_loss_beyond_the_float_range_is_the_float64_reference_divided_by_z():
    """Issue 13: log P − log q up to 250 (P/q up to e^250 ≈ 4e108, beyond float32's 3.4e38): the loss and the gradient
    are finite, and equal the GDC code's unnormalised P/q form computed in float64, divided by Ẑ."""
    log_q = torch.tensor([-3.0, -4.0, -2.5, -6.0, -5.0], dtype=torch.float64)
    log_ratio = torch.tensor([100.0, 250.0, 120.0, -math.inf, 180.0], dtype=torch.float64)
    log_target = log_q + log_ratio
    log_pi_value = torch.tensor([-2.0, -5.0, -2.0, -4.0, -6.5], dtype=torch.float64)
    ratio = torch.exp(log_ratio)  # float64 holds e^250
    z = ratio.mean()
    for baseline in (False, True):
        # the reference: the GDC code's advantage P/q (− Ẑ·π/q), in float64
        reference_logps = log_pi_value.clone().requires_grad_(True)
        advantage = ratio - (z * torch.exp(log_pi_value - log_q) if baseline else 0.0)
        (reference_grad,) = torch.autograd.grad((-advantage * reference_logps).mean(), [reference_logps])
        # float32 inputs round log P (≈ 250) to ~1e-5 and P/(Ẑq) ≈ e^-150 to 0: compare the vectors as a whole
        for dtype, tolerance in ((torch.float32, 1e-4), (torch.float64, 1e-12)):
            log_pi = log_pi_value.to(dtype).requires_grad_(True)
            loss, ours = dpg_loss(log_pi, log_target.to(dtype), log_q.to(dtype), torch.log(z), baseline=baseline)
            (grad,) = torch.autograd.grad(loss.mean(), [log_pi])
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and torch.isfinite(ours).all()
            for scaled, expected in ((grad.double() * z, reference_grad), (ours.double() * z, advantage)):
                assert float((scaled - expected).norm() / expected.norm()) < tolerance
    # the normalised weights stay bounded by the sample count even where float64 itself overflows (log P/q ≥ 1000)
    log_z = torch.logsumexp(log_ratio + 900, 0) - math.log(5)
    _, weights = dpg_loss(torch.zeros(5), log_target + 900, log_q, log_z)
    assert torch.isfinite(weights).all() and float(weights.sum()) == pytest.approx(5.0)


def amazing_bonus(prompts: list[str], completions: list[str]) -> list[float]:
    """r = 1 + ½·(number of "amazing"): with β = 0.01, log P − log a = r/β ∈ [100, 250]."""
    return [1.0 + 0.5 * text.split().count("amazing") for text in completions]


@pytest.mark.parametrize("baseline", [False, True], ids=["kl_dpg", "gdc_pp"])
def test_a_kl_control_target_beyond_float32_trains_with_the_scaled_float64_gradient(toy_lm, baseline):
    """Issue 13: KLControlTarget(r, β = 0.01) puts log P − log q ≥ 100 on every sample; the unnormalised P/q of the
    GDC code is inf in float32 (the loss was inf). The step's loss and gradient are finite and equal the GDC code's
    advantage, evaluated in float64 on the same samples, divided by Ẑ = their mean P/q."""
    torch.manual_seed(0)
    target = KLControlTarget(CallableReward(amazing_bonus), beta=0.01)
    module = DistributionMatchingModule(
        target, model=toy_lm, sampling=SamplingSettings(max_new_tokens=NEW_TOKENS), baseline=baseline
    )
    module.configure_model()
    module.log_values = lambda *args, **kwargs: None  # no trainer here; logging is tested elsewhere
    data = toy_data(num_train=16, batch_size=16).attach(module.tokenizer, "prompt")
    data.setup("fit")
    loss = module.training_step(next(iter(data.dataloader("train"))), 0)
    parameters = list(module.policy.parameters())
    grads = torch.autograd.grad(loss, parameters)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)

    step = module.window[-1]
    log_target, log_q, width = step["log_target"], step["log_q"], int(step["width"])
    ratio = torch.exp(log_target - log_q)  # float64
    assert float(ratio.min()) > torch.finfo(torch.float32).max  # every P/q is inf in float32
    z = ratio.mean()
    assert float(module.log_z) == pytest.approx(float(torch.log(z)), rel=1e-9)
    policy64 = copy.deepcopy(module.policy).double()
    log_pi = torch.cat(
        [
            exact_logprobs_with_grad(policy64, step["sequences"][row, width:][mask.bool()].tolist())
            for row, mask in enumerate(step["response_mask"])
        ]
    )
    advantage = ratio - (z * torch.exp(log_pi.detach() - log_q) if baseline else 0.0)  # float64, up to e^250
    # ÷ Ẑ before the backward: Llama's RMSNorm computes in float32 even in a float64 copy, so a backward pass
    # carrying e^100-sized gradients overflows there
    reference = torch.autograd.grad((-(advantage / z) * log_pi).mean(), list(policy64.parameters()))
    ours = torch.cat([g.flatten() for g in grads]).double()
    theirs = torch.cat([g.flatten() for g in reference])
    assert float(theirs.norm()) > 0
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-4  # float32 forward vs float64 log-softmax


# ---- estimators and metrics ------------------------------------------------------------------------------------


def test_importance_estimators_match_hand_values():
    # q uniform over 4 points; P = [2, 0, 1, 1]·(1/4) unnormalised; π = [0.5, 0.1, 0.2, 0.2]
    log_q = torch.log(torch.full((4,), 0.25, dtype=torch.float64))
    log_p = torch.log(torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64))
    log_pi = torch.log(torch.tensor([0.5, 0.1, 0.2, 0.2], dtype=torch.float64))
    # Σ P = 1: p = [0.5, 0, 0.25, 0.25], log Ẑ = 0
    expected_kl = 0.5 * math.log(0.5 / 0.5) + 2 * 0.25 * math.log(0.25 / 0.2)
    expected_tvd = 0.5 * (0 + 0.1 + 0.05 + 0.05)
    assert float(importance_kl(log_p, log_q, log_pi, 0.0)) == pytest.approx(expected_kl)
    assert float(importance_tvd(log_p, log_q, log_pi, 0.0)) == pytest.approx(expected_tvd)
    # P scaled by e^500 (beyond float64) with log Ẑ = 500: the same normalised p, the same divergences
    assert float(importance_kl(log_p + 500, log_q, log_pi, 500.0)) == pytest.approx(expected_kl)
    assert float(importance_tvd(log_p + 500, log_q, log_pi, 500.0)) == pytest.approx(expected_tvd)


def test_dpg_loss_hand_values():
    log_pi, log_p, log_q = (
        torch.log(torch.tensor([0.2, 0.4])),
        torch.log(torch.tensor([0.3, 0.0])),
        torch.log(torch.tensor([0.5, 0.5])),
    )
    loss, advantage = dpg_loss(log_pi, log_p, log_q)
    assert advantage.tolist() == pytest.approx([0.6, 0.0])  # P/q
    _, with_baseline = dpg_loss(log_pi, log_p, log_q, log_z=math.log(0.5), baseline=True)
    assert with_baseline.tolist() == pytest.approx([0.6 / 0.5 - 0.4, 0.0 - 0.8])  # P/(Ẑq) − π/q
    assert loss.tolist() == pytest.approx([-0.6 * math.log(0.2), 0.0])


def test_diversity_metrics_and_features_hand_values():
    assert distinct_n("the cat the cat", 1) == 0.5  # {the, cat} / 4 tokens
    assert distinct_n("the cat the cat", 2) == 0.5  # {the cat, cat the} / 4
    assert self_bleu(["a b c d", "a b c d"], 4) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "w x y z"], 4) == pytest.approx(0.0, abs=1e-6)
    assert WordFeature("amazing")("An Amazing day") == 1.0 and WordFeature("amazing")("amazingly") == 0.0
    assert FemalePronounFeature()("She said her brother saw him") == 1.0
    assert FemalePronounFeature()("He said his sister saw her") == 0.0


# ---- alignment-tax callbacks on distribution matching -----------------------------------------------------------


def test_elastic_reset_and_interpolation_work_on_distribution_matching(toy_lm):
    from recording import Recorder

    from callbacks import ElasticReset, WeightInterpolation

    recorder, decay, alpha = Recorder(), 0.5, 0.25
    module = towards_amazing(toy_lm, learning_rate=3e-3)
    callbacks = [recorder, ElasticReset(reset_every=2, decay=decay), WeightInterpolation(alpha=alpha)]
    torch.manual_seed(0)
    fit(module, toy_data(num_train=128, batch_size=64), callbacks, max_steps=2)
    theta0, (theta1, theta2) = recorder.initial, recorder.after
    for name, parameter in module.policy.named_parameters():
        reset_to = decay * (decay * theta0[name] + (1 - decay) * theta1[name]) + (1 - decay) * theta2[name]
        # Elastic Reset after step 2, then the interpolation toward θ_0 at the end of training
        expected = (1 - alpha) * theta0[name] + alpha * reset_to
        assert torch.allclose(parameter, expected, atol=1e-6), name
    assert not torch.allclose(theta2["model.norm.weight"], theta0["model.norm.weight"])


def test_the_logged_gradient_variance_matches_per_sample_gradients(toy_lm):
    torch.manual_seed(0)
    module = towards_amazing(toy_lm, learning_rate=1e-12)
    fit(module, toy_data(num_train=64, batch_size=64), max_steps=1)
    data = toy_data(num_train=16, batch_size=16).attach(module.tokenizer, "prompt")
    data.setup("fit")
    batch = next(iter(data.dataloader("train")))
    with torch.no_grad():
        sequences, attention, response_mask, width, completions = module.sample(module.proposal, batch)
        log_q = module.sequence_logprobs_of(module.proposal, sequences, attention, width, response_mask).double()
    log_target = log_q + torch.log(torch.tensor([float("amazing" in c.split()) for c in completions]))
    logged = module.gradient_variance(sequences, attention, width, response_mask, log_target, log_q)
    gradients = []
    for row in range(sequences.shape[0]):
        tokens = sequences[row, width:][response_mask[row].bool()].tolist()
        loss, _ = dpg_loss(exact_logprobs_with_grad(module.policy, tokens), log_target[row : row + 1],
                           log_q[row : row + 1], log_z=module.log_z, baseline=True)  # fmt: skip
        grads = torch.autograd.grad(loss.sum(), list(module.policy.parameters()))
        gradients.append(torch.cat([g.reshape(-1) for g in grads]).double())
    stacked = torch.stack(gradients)
    expected = float(stacked.pow(2).sum(-1).mean() - stacked.mean(0).pow(2).sum())
    assert expected > 0
    assert float(logged) == pytest.approx(expected, rel=1e-3)


def test_the_cli_keeps_the_targets_config_so_a_checkpoint_rebuilds_it(monkeypatch, tmp_path):
    """The target (an object) is not pickled into checkpoints; the config it was built from is, so
    ``load_from_checkpoint`` and ``lit-align export`` rebuild it (Lightning's ``instantiate_module``)."""
    import sys
    from pathlib import Path

    from lightning.pytorch.cli import instantiate_module

    from datamodules.base import BenchmarkDataModule
    from lit_align.base import AlignmentModule
    from lit_align.cli import TRAINER_DEFAULTS_FILE, AlignCLI
    from lit_align.ebm import PointwiseConstraint

    monkeypatch.setattr(sys, "argv", ["lit-align"])
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs/controlled/science_wordlist.yaml"
    cli = AlignCLI(
        AlignmentModule, BenchmarkDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        parser_kwargs={"default_config_files": [str(TRAINER_DEFAULTS_FILE)]},
        args=["--config", str(config), "--model.init_args.model", "tiny-llama"], save_config_callback=None,
    )  # fmt: skip
    saved = cli.model.hparams["target"]
    assert saved["class_path"] == "lit_align.ebm.PointwiseConstraint"
    assert "laboratory" in saved["init_args"]["features"]["science"]["init_args"]["words"]
    hparams = {key: value for key, value in cli.model.hparams.items() if key != "_instantiator"}
    rebuilt = instantiate_module(DistributionMatchingModule, hparams)
    assert isinstance(rebuilt.target, PointwiseConstraint) and rebuilt.target.feature_names == ["science"]
    assert "target" not in DistributionMatchingModule(model="tiny-llama", target=rebuilt.target).hparams


def test_the_gradient_variance_is_logged_only_at_the_steps_it_is_measured(toy_lm, tmp_path):
    """``grad_variance_every: 2`` over 4 steps: metrics.csv holds it at steps 0 and 2 only (through ``self.log``,
    Lightning would repeat the last value at every step until the epoch ends)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = towards_amazing(toy_lm, grad_variance_every=2)
    logger = CSVLogger(tmp_path, name="dm")
    fit(module, toy_data(num_train=64, batch_size=16), max_steps=4, logger=logger, log_every_n_steps=1)
    with open(f"{logger.log_dir}/metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    measured = {int(row["step"]): float(row["dpg/grad_variance"]) for row in rows if row["dpg/grad_variance"]}
    assert sorted(measured) == [0, 2] and all(value > 0 for value in measured.values())
    assert {int(row["step"]) for row in rows if row["loss"]} == {0, 1, 2, 3}
