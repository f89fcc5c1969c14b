"""Distribution matching on an exactly enumerable toy LM: a 2-layer Llama over 6 tokens with 3 new tokens, so every
completion (156 of them) and its exact probability is known. λ fitting against the exact solution, the exact
KL(p‖π) falling under KL-DPG and GDC++, GDC++'s lower gradient variance, the proposal-update rule, and the
estimators and diversity metrics against hand values."""

from __future__ import annotations

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
    PointwiseConstraint,
    WordFeature,
    fit_lambdas,
    importance_kl,
    importance_tvd,
)
from lit_align.losses import dpg_loss
from lit_align.metrics import distinct_n, self_bleu
from lit_align.models import tiny_llama

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
        learning_rate=0.0,
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
    fit(module, toy_data(num_train=40 * 64, batch_size=64), max_steps=40)
    end = exact_kl_p_pi(log_a, b, exact_logprobs(module.policy, completions))
    assert end < 0.5 * start, (start, end)
    assert int(module.proposal_updates) >= 1


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
            loss, _ = dpg_loss(log_pi, log_target, log_a[index], z=z, baseline=baseline)
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
    proposal_before = {n: p.detach().clone() for n, p in module.proposal.named_parameters()}
    data = toy_data(num_train=256, batch_size=256).attach(module.tokenizer, "prompt")
    data.setup("fit")
    batch = next(iter(data.dataloader("train")))

    def check(policy_weights: dict[str, torch.Tensor]) -> tuple[bool, bool]:
        """(updated?, expected from the test's own estimate on the same samples)."""
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
        z = module.z
        ours = {
            name: float(-torch.log(z) + (weights * torch.where(b > 0, log_target - other, 0.0)).mean() / z)
            for name, other in (("pi", log_pi), ("q", log_q))
        }
        module.window = [
            {"sequences": sequences, "attention_mask": attention, "response_mask": response_mask,
             "width": torch.tensor(width), "log_target": log_target, "log_q": log_q}
        ]  # fmt: skip
        updates = int(module.proposal_updates)
        updated = module.maybe_update_proposal()
        assert updated == (int(module.proposal_updates) == updates + 1)
        return updated, ours["pi"] < ours["q"]

    random_policy = {n: torch.randn_like(p) * 0.5 for n, p in trained.items()}
    updated, expected = check(random_policy)
    assert not updated and not expected
    assert all(torch.equal(p, proposal_before[n]) for n, p in module.proposal.named_parameters())
    updated, expected = check(trained)
    assert updated and expected
    assert all(torch.equal(p, trained[n]) for n, p in module.proposal.named_parameters())


# ---- estimators and metrics ------------------------------------------------------------------------------------


def test_importance_estimators_match_hand_values():
    # q uniform over 4 points; P = [2, 0, 1, 1]·(1/4) unnormalised; π = [0.5, 0.1, 0.2, 0.2]
    log_q = torch.log(torch.full((4,), 0.25))
    log_p = torch.log(torch.tensor([0.5, 0.0, 0.25, 0.25]))
    log_pi = torch.log(torch.tensor([0.5, 0.1, 0.2, 0.2]))
    z = 1.0  # Σ P = 1: p = [0.5, 0, 0.25, 0.25]
    expected_kl = 0.5 * math.log(0.5 / 0.5) + 2 * 0.25 * math.log(0.25 / 0.2)
    assert float(importance_kl(log_p, log_q, log_pi, z)) == pytest.approx(expected_kl)
    assert float(importance_tvd(log_p, log_q, log_pi, z)) == pytest.approx(0.5 * (0 + 0.1 + 0.05 + 0.05))


def test_dpg_loss_hand_values():
    log_pi, log_p, log_q = (
        torch.log(torch.tensor([0.2, 0.4])),
        torch.log(torch.tensor([0.3, 0.0])),
        torch.log(torch.tensor([0.5, 0.5])),
    )
    loss, advantage = dpg_loss(log_pi, log_p, log_q)
    assert advantage.tolist() == pytest.approx([0.6, 0.0])  # P/q
    _, with_baseline = dpg_loss(log_pi, log_p, log_q, z=0.5, baseline=True)
    assert with_baseline.tolist() == pytest.approx([0.6 - 0.5 * 0.4, 0.0 - 0.5 * 0.8])  # P/q − Ẑ·π/q
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
    module = towards_amazing(toy_lm, learning_rate=0.0)
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
                           log_q[row : row + 1], z=module.z, baseline=True)  # fmt: skip
        grads = torch.autograd.grad(loss.sum(), list(module.policy.parameters()))
        gradients.append(torch.cat([g.reshape(-1) for g in grads]).double())
    stacked = torch.stack(gradients)
    expected = float(stacked.pow(2).sum(-1).mean() - stacked.mean(0).pow(2).sum())
    assert expected > 0
    assert float(logged) == pytest.approx(expected, rel=1e-3)
