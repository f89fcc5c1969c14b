"""PPOModule's defaults do what the papers and TRL do (issue 13): every rollout makes exactly
``ppo_epochs × num_mini_batches`` optimizer steps (uneven splits are refused), advantages are whitened per the
estimator's convention, and β controls the drift on the default PPO path."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import exact_kl_to_reference, fit, hh_pairs, hh_prompts

from lit_align.losses import masked_mean
from lit_align.ppo import PPOModule, group_normalized_advantages, rloo_advantages
from lit_align.rewards import CallableReward


def length_reward(prompts, completions):
    return [float(len(completion)) for completion in completions]


class CountSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1


# ---- 1. equal minibatches: exactly ppo_epochs × num_mini_batches optimizer steps per rollout ---------------------


@pytest.mark.parametrize(
    "batch_size, samples, estimator, minibatches, accumulation, ppo_epochs, prompts",
    [
        (4, 1, "gae", 2, 1, 2, 8),  # 2 rollouts of 4 rows, minibatches of 2
        (2, 2, "rloo", 4, 1, 1, 4),  # 2 rollouts of 2 prompts × 2 samples, minibatches of 1 row
        (4, 1, "gae", 1, 4, 1, 8),  # micro-batches do not add steps
        (4, 1, "gae", 2, 1, 1, 10),  # batches of 4, 4 and a partial 2: each still splits into 2 minibatches
        (6, 2, "grpo", 3, 2, 1, 6),  # 1 rollout of 12 rows → 3 minibatches of 4 → 2 micro-batches of 2
    ],
)
def test_every_rollout_makes_ppo_epochs_times_num_mini_batches_optimizer_steps(
    hh_dir, batch_size, samples, estimator, minibatches, accumulation, ppo_epochs, prompts
):
    module = PPOModule(
        model="tiny-llama",
        reward=CallableReward(length_reward),
        advantage_estimator=estimator,
        samples_per_prompt=samples,
        sampling={"max_new_tokens": 3},
        ppo_epochs=ppo_epochs,
        num_mini_batches=minibatches,
        gradient_accumulation_steps=accumulation,
        drift_texts=0,
    )
    counter = CountSteps()
    data = hh_pairs(hh_dir, holdout=0, limit_train=prompts, batch_size=batch_size)
    fit(module, data, [counter], max_epochs=1)
    rollouts = -(-prompts // batch_size)
    assert module.global_step == counter.steps == rollouts * ppo_epochs * minibatches


@pytest.mark.parametrize(
    "batch_size, minibatches, accumulation, prompts, message",
    [
        # 3 rows into 2 minibatches: today's split(3 // 2) made 3 optimizer steps instead of 2
        (3, 2, 1, 6, r"rollout of 3 rows \(the DataModule's batch_size: 3 prompts .* num_mini_batches=2 equal"),
        (4, 2, 4, 8, r"minibatch of 2 rows .* gradient_accumulation_steps=4"),
        # full batches of 4 split, but the loader's last batch of 2 prompts would not split into 4 minibatches
        (4, 4, 1, 10, r"rollout of 2 rows \(the last batch of each epoch, 10 prompts per rank in batches of 4"),
    ],
)
def test_a_rollout_that_does_not_split_evenly_is_refused_before_training(
    hh_dir, batch_size, minibatches, accumulation, prompts, message
):
    module = PPOModule(
        model="tiny-llama",
        reward=CallableReward(length_reward),
        sampling={"max_new_tokens": 3},
        num_mini_batches=minibatches,
        gradient_accumulation_steps=accumulation,
        drift_texts=0,
    )
    counter = CountSteps()
    with pytest.raises(ValueError, match=message):
        fit(module, hh_pairs(hh_dir, holdout=0, limit_train=prompts, batch_size=batch_size), [counter], max_epochs=1)
    assert counter.steps == 0


def test_minibatch_settings_below_one_are_refused_at_construction():
    with pytest.raises(ValueError, match="num_mini_batches must be >= 1, got 0"):
        PPOModule(model="tiny-llama", reward=CallableReward(length_reward), num_mini_batches=0)


# ---- 2. whitening follows the estimator: GAE yes, RLOO and GRPO no ----------------------------------------------


class UnequalLengths(PPOModule):
    """Responses cut to 1, 2, 3, ... tokens after sampling, so a token-weighted batch mean of per-sequence
    advantages is not their sequence mean (as with real EOS), and the first prompt's samples all score 0.5 while
    the second prompt's score 0, 1, 2, 3."""

    def generate_responses(self, model, prompt_ids, prompt_mask, sampling):
        sequences, attention_mask, response_mask = super().generate_responses(model, prompt_ids, prompt_mask, sampling)
        width, length = prompt_ids.shape[1], response_mask.shape[1]
        lengths = torch.arange(sequences.shape[0]) % length + 1
        keep = (torch.arange(length)[None] < lengths[:, None]).to(response_mask.dtype) * response_mask
        sequences, attention_mask = sequences.clone(), attention_mask.clone()
        sequences[:, width:][keep == 0] = self.tokenizer.eos_token_id
        attention_mask[:, width:] = keep
        return sequences, attention_mask, keep


def group_scores(prompts, completions):
    return [0.5 if i < 4 else float(i - 4) for i in range(len(completions))]


def first_rollout(hh_dir, estimator: str, samples: int, batch_size: int = 2, **kwargs):
    L.seed_everything(0)
    module = UnequalLengths(
        model="tiny-llama",
        reward=CallableReward(group_scores),
        advantage_estimator=estimator,
        samples_per_prompt=samples,
        sampling={"max_new_tokens": 4},
        kl_coef=0.0,
        drift_texts=0,
        **kwargs,
    )
    module.configure_model()
    data = hh_pairs(hh_dir, holdout=0, batch_size=batch_size)
    data.attach(module.tokenizer, "prompt")
    data.setup("fit")
    rollout, stats = module.rollout(next(iter(data.train_dataloader())), "train")
    return rollout, stats["objective/scores"]


def test_rloo_does_not_whiten_by_default_so_a_group_without_signal_gets_zero_advantages(hh_dir):
    rollout, scores = first_rollout(hh_dir, "rloo", 4)
    mask = rollout.response_mask
    assert torch.equal(scores, torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 2.0, 3.0]))
    assert len(set(mask.sum(-1).tolist())) > 1  # unequal lengths: a batch whitening would shift every token
    assert torch.equal(rollout.advantages[:4], torch.zeros_like(rollout.advantages[:4]))  # exactly zero
    # the other group: A_i = r_i − mean_{j≠i} r_j = (−2, −2/3, 2/3, 2) on every real token, nothing rescaled
    expected = torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0])[:, None] * mask[4:]
    torch.testing.assert_close(rollout.advantages[4:], expected)
    assert torch.equal(rloo_advantages(scores, 4)[:4], torch.zeros(4))
    # an explicit whiten_advantages=True still applies, and then the no-signal group is not zero
    whitened, _ = first_rollout(hh_dir, "rloo", 4, whiten_advantages=True)
    assert whitened.advantages[:4][mask[:4].bool()].abs().min() > 0.01


def test_grpo_estimator_keeps_the_group_normalised_advantages(hh_dir):
    rollout, scores = first_rollout(hh_dir, "grpo", 4)
    expected = group_normalized_advantages(scores, 4)[:, None] * rollout.response_mask
    torch.testing.assert_close(rollout.advantages, expected)


def test_gae_whitens_advantages_by_default(hh_dir):
    rollout, _ = first_rollout(hh_dir, "gae", 1, batch_size=8)  # 20 real tokens
    mask = rollout.response_mask.float()
    assert abs(float(masked_mean(rollout.advantages, mask))) < 1e-5
    assert float(masked_mean(rollout.advantages**2, mask)) == pytest.approx(19 / 20, rel=1e-4)  # unbiased var 1
    raw, _ = first_rollout(hh_dir, "gae", 1, batch_size=8, whiten_advantages=False)
    assert abs(float(masked_mean(raw.advantages, mask))) > 0.1  # the scores 0.5 ... 7 are not centred


# ---- 3. β controls the drift on the default PPO path -------------------------------------------------------------

TARGET = " bets"  # the peaked tiny model samples it ~2.5% of the time at the start


def half_per_target(prompts, completions):
    """0.5 per target token. With whitened advantages only β relative to the score matters: at 1 per token, β=0.1
    barely binds (the optimum π_ref·exp(r/β) puts ~all mass on the target) and within this budget drifted as far as
    β=0 for one seed in five; at 0.5 per token β=0.1 binds."""
    return [0.5 * completion.count(TARGET) for completion in completions]


def test_drift_falls_as_the_kl_coefficient_rises_with_the_default_ppo_settings(peaked_tiny, hh_dir):
    # Everything PPO-specific is at its default: GAE, the value head on the policy trunk, whitened advantages,
    # vf_coef, clipping, the k1 KL folded into the per-token reward. Measured here (exact KL, seeds 0/1/2/3/4):
    # β=0: 1.64/2.76/2.31/1.40/1.63, β=0.1: 1.02/1.27/1.32/1.04/1.07, β=1: 0.65/0.59/0.74/0.51/0.48 nats, i.e.
    # drift(0.1)/drift(0) ≤ 0.74 and drift(1)/drift(0.1) ≤ 0.64.
    drift = {}
    for kl_coef in (0.0, 0.1, 1.0):
        L.seed_everything(0)
        module = PPOModule(
            model=peaked_tiny,
            reward=CallableReward(half_per_target),
            sampling={"max_new_tokens": 8},
            kl_coef=kl_coef,
            ppo_epochs=2,
            learning_rate=3e-4,
            lr_scheduler="constant",
            drift_texts=0,
        )
        # 16 prompts per rollout: with 4 (test_ppo.py's setting) the policy-gradient noise moved the policy
        # 0.5-0.7 nats even at β=1 and the seeds' spread hid β's effect.
        data = hh_prompts(hh_dir, limit_train=64, batch_size=16, max_prompt_length=8)
        fit(module, data, max_epochs=3)  # 12 rollouts, 24 optimizer steps
        drift[kl_coef] = exact_kl_to_reference(module.eval(), data)
    assert drift[0.0] > 1.2, drift  # unconstrained, the policy moves towards the target token
    assert drift[0.1] < 0.85 * drift[0.0], drift
    assert drift[1.0] < 0.8 * drift[0.1], drift
