"""Sampling settings: one dataclass shared by PPO and distribution matching, checked before any model loads."""

from __future__ import annotations

import math

import pytest
import torch

from lit_align import DistributionMatchingModule, PPOModule, SamplingSettings
from lit_align.ebm import PointwiseConstraint, WordFeature
from lit_align.generation import InverseCDFSampler, sample_responses
from lit_align.models import load_causal_lm, load_tokenizer
from lit_align.rewards import LexiconSentimentReward


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens must be in [0, max_new_tokens=4]"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ],
)
def test_bad_sampling_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        SamplingSettings(**fields)


def test_modules_take_settings_or_a_dict_and_refuse_unknown_fields():
    ppo = PPOModule(model="tiny-llama", reward=LexiconSentimentReward(), sampling={"max_new_tokens": 5, "top_p": 0.9})
    assert ppo.sampling == SamplingSettings(max_new_tokens=5, top_p=0.9)
    assert PPOModule(model="tiny-llama", reward=LexiconSentimentReward()).sampling.max_new_tokens == 32
    target = PointwiseConstraint({"amazing": WordFeature("amazing")})
    assert DistributionMatchingModule(target, model="tiny-llama").sampling.max_new_tokens == 40  # its own default
    with pytest.raises(ValueError, match=r"unknown settings \['max_tokens'\]"):
        PPOModule(model="tiny-llama", reward=LexiconSentimentReward(), sampling={"max_tokens": 5})


def nucleus_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Sampling's distribution computed by hand in float64: softmax(logits / T), the top_k largest kept, then the
    smallest set of the largest probabilities whose mass reaches top_p, renormalised."""
    weights = [math.exp(x / temperature) for x in logits]
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[:top_k]
    total = sum(weights[i] for i in order)
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += weights[i] / total
        if mass >= top_p:
            break
    kept_total = sum(weights[i] for i in kept)
    return [weights[i] / kept_total if i in kept else 0.0 for i in range(len(logits))]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (0.8, 5, 0.9)]
)
def test_the_sampler_draws_from_the_tempered_truncated_softmax(temperature, top_k, top_p):
    logits = [2.0, 1.5, 0.3, 0.0, -0.4, -1.0, -3.0]
    expected = torch.tensor(nucleus_distribution(logits, temperature, top_k or len(logits), top_p))
    sampler = InverseCDFSampler(SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p))
    draws = 40_000
    torch.manual_seed(0)
    out = sampler(torch.zeros(draws, 1, dtype=torch.long), torch.tensor(logits).repeat(draws, 1))
    assert ((out == 0).sum(-1) == 1).all() and (out.isinf() | (out == 0)).all()  # one token kept per row
    counts = torch.bincount(out.argmax(-1), minlength=len(logits)).double()
    assert (counts[expected == 0] == 0).all()  # never outside the support
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 5 * standard_error + 1e-12).all(), (counts / draws, expected)


def test_generate_with_the_sampler_keeps_min_new_tokens_eos_and_the_seed():
    model = load_causal_lm("tiny-llama")
    tokenizer = load_tokenizer("tiny-llama")
    prompts = tokenizer(["a b c", "d"], return_tensors="pt", padding=True)
    eos = tokenizer.eos_token_id

    def sample(settings: SamplingSettings, seed: int = 0):
        torch.manual_seed(seed)
        return sample_responses(model, tokenizer, prompts["input_ids"], prompts["attention_mask"], settings)

    sequences, attention, response_mask = sample(SamplingSettings(max_new_tokens=12, min_new_tokens=6))
    responses = sequences[:, prompts["input_ids"].shape[1] :]
    assert (responses[:, :6] != eos).all()  # min_new_tokens still applies before the draw
    assert torch.equal(sample(SamplingSettings(max_new_tokens=12, min_new_tokens=6))[0], sequences)  # seeded
    assert not torch.equal(sample(SamplingSettings(max_new_tokens=12, min_new_tokens=6), seed=1)[0], sequences)
    # a static KV cache samples the same tokens as the dynamic one
    static = sample(SamplingSettings(max_new_tokens=12, min_new_tokens=6, cache_implementation="static"))[0]
    assert torch.equal(static, sequences)
    with pytest.raises(ValueError, match="cache_implementation must be"):
        SamplingSettings(cache_implementation="offloaded")
