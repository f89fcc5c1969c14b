"""Sampling settings: one dataclass shared by PPO and distribution matching, checked before any model loads."""

from __future__ import annotations

import pytest

from lit_align import DistributionMatchingModule, PPOModule, SamplingSettings
from lit_align.ebm import PointwiseConstraint, WordFeature
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
