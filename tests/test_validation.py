"""Argument combinations that could never train are refused when a module is *constructed*: a ValueError naming the
argument and its value, raised from ``__init__`` before the tokenizer or any model is loaded — not at the first step,
after minutes of loading.

Every test here replaces the loaders (tokenizer, causal LM, sequence classifier, ``build_models``) with functions that
fail the test if called, so a check that is missing (or that runs after loading) shows up as that failure instead
of the ValueError.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import SchedulerType, get_scheduler

import lit_align.base
import lit_align.reward_model
from lit_align import AlignmentModule, DPOModule, KTOModule, RewardModelModule, SFTModule
from lit_align.base import LR_SCHEDULERS
from lit_align.losses import PREFERENCE_LOSSES
from lit_align.losses.preference import LABEL_SMOOTHING_LOSSES

MODULES = (DPOModule, KTOModule, RewardModelModule, SFTModule)
UNREACHABLE = "no/such-model"  # a Hub id: loading it would fail offline (after retries), never quickly


@pytest.fixture(autouse=True)
def loading_fails_the_test(monkeypatch):
    """Any attempt to load a tokenizer or model during construction fails the test."""

    def loaded(*args, **kwargs):
        raise AssertionError(f"a tokenizer or model was loaded during construction ({args})")

    monkeypatch.setattr(lit_align.base, "load_tokenizer", loaded)
    monkeypatch.setattr(lit_align.base, "load_causal_lm", loaded)
    monkeypatch.setattr(lit_align.reward_model, "load_sequence_classifier", loaded)
    monkeypatch.setattr(AlignmentModule, "build_models", loaded)


def refused(module_class, argument: str, value, **kwargs) -> str:
    """Construct ``module_class(**kwargs)``; assert a ValueError from ``__init__`` naming ``argument`` and ``value``."""
    with pytest.raises(ValueError) as caught:
        module_class(model=UNREACHABLE, **kwargs)
    message = str(caught.value)
    assert argument in message, message
    assert str(value) in message, message
    frames = [entry.name for entry in caught.traceback]
    assert "__init__" in frames, frames  # raised while constructing, not by a later hook
    return message


# ---- preference losses (DPOModule) ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(set(PREFERENCE_LOSSES) - LABEL_SMOOTHING_LOSSES))
def test_label_smoothing_with_a_loss_that_ignores_it_is_refused(loss_type):
    message = refused(DPOModule, "label_smoothing", 0.1, loss_type=loss_type, label_smoothing=0.1)
    assert repr(loss_type) in message
    for name in LABEL_SMOOTHING_LOSSES:  # the message lists the losses that do take it
        assert name in message


@pytest.mark.parametrize("loss_type", sorted(LABEL_SMOOTHING_LOSSES))
@pytest.mark.parametrize("label_smoothing", [0.5, 0.7, -0.1])
def test_label_smoothing_outside_zero_to_half_is_refused(loss_type, label_smoothing):
    message = refused(
        DPOModule, "label_smoothing", label_smoothing, loss_type=loss_type, label_smoothing=label_smoothing
    )
    assert "[0, 0.5)" in message


def test_unknown_loss_type_is_refused_with_the_valid_names():
    message = refused(DPOModule, "loss_type", "'dpo'", loss_type="dpo")
    for name in PREFERENCE_LOSSES:
        assert name in message


@pytest.mark.parametrize("module_class", [DPOModule, KTOModule])
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_non_positive_beta_is_refused(module_class, beta):
    refused(module_class, "beta", beta, beta=beta)


def test_dpo_precompute_batch_size_below_one_is_refused():
    refused(DPOModule, "precompute_batch_size", 0, precompute_batch_size=0, precompute_ref_logps=True)


def test_dpo_bad_normalization_pattern_is_refused():
    with pytest.raises(re.error):
        DPOModule(model=UNREACHABLE, normalize_pair_gradients=True, normalization_parameters="layers.(")


# ---- KTO and the reward model --------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["desirable_weight", "undesirable_weight"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_kto_non_positive_weights_are_refused(argument, value):
    refused(KTOModule, argument, value, **{argument: value})


def test_reward_model_negative_centring_coefficient_is_refused():
    refused(RewardModelModule, "center_rewards_coefficient", -0.01, center_rewards_coefficient=-0.01)


# ---- optimizer settings (AlignmentModule, every module) ------------------------------------------------------


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("learning_rate", [0.0, -1e-5])
def test_non_positive_learning_rate_is_refused(module_class, learning_rate):
    refused(module_class, "learning_rate", learning_rate, learning_rate=learning_rate)


@pytest.mark.parametrize("module_class", MODULES)
def test_unknown_lr_scheduler_is_refused_with_the_valid_names(module_class):
    message = refused(module_class, "lr_scheduler", "'cosine_annealing'", lr_scheduler="cosine_annealing")
    for name in ("cosine", "linear", "constant_with_warmup", *LR_SCHEDULERS):
        assert name in message


@pytest.mark.parametrize("name", sorted({t.value for t in SchedulerType} - set(LR_SCHEDULERS)))
def test_schedulers_needing_more_than_warmup_and_total_are_refused(name):
    refused(SFTModule, "lr_scheduler", repr(name), lr_scheduler=name)


@pytest.mark.parametrize(
    "argument,value,extra",
    [
        ("warmup_steps", -1, {}),
        ("warmup_ratio", -0.1, {}),
        ("warmup_ratio", 1.5, {}),
        ("warmup_steps", 10, {"lr_scheduler": "constant"}),  # constant ignores warm-up silently
        ("warmup_ratio", 0.1, {"lr_scheduler": "constant"}),
    ],
)
def test_bad_warmup_is_refused(argument, value, extra):
    refused(KTOModule, argument, value, **{argument: value, **extra})


# ---- what is accepted still constructs, and every accepted scheduler really builds -------------------------


@pytest.mark.parametrize(
    "module_class,kwargs",
    [
        (DPOModule, {"loss_type": "sigmoid", "label_smoothing": 0.49}),
        (DPOModule, {"loss_type": "robust", "label_smoothing": 0.2}),
        (DPOModule, {"loss_type": "simpo", "label_smoothing": 0.1, "beta": 2.0}),
        (DPOModule, {"loss_type": "hinge", "label_smoothing": 0.0}),
        (KTOModule, {"desirable_weight": 1.33, "undesirable_weight": 0.5}),
        (RewardModelModule, {"center_rewards_coefficient": 0.01}),
        (SFTModule, {"lr_scheduler": "constant_with_warmup", "warmup_steps": 5}),
        (SFTModule, {"lr_scheduler": "linear", "warmup_ratio": 1.0}),
    ],
)
def test_valid_combinations_construct_without_loading_a_model(module_class, kwargs, monkeypatch):
    monkeypatch.setattr(lit_align.base, "load_tokenizer", lambda name: object())  # construction keeps a tokenizer
    module = module_class(model=UNREACHABLE, **kwargs)
    assert module.policy is None and module.reference is None  # models are built in configure_model only
    for name, value in kwargs.items():
        assert module.hparams[name] == value


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_accepted_scheduler_builds_from_warmup_and_total_steps(name):
    # what AlignmentModule.configure_optimizers calls: a name accepted at construction must not fail there
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10)
    optimizer.step()
    scheduler.step()  # steps without a monitored metric
