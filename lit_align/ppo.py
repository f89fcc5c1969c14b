"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022), and RLOO / GRPO.

The file reads in the order of one iteration (one ``training_step`` = one rollout batch):

1. **rollout** — sample ``samples_per_prompt`` completions per prompt from the policy (``generate``);
2. **score** — the reward function on the decoded texts (minus ``missing_eos_penalty`` without EOS);
3. **reference** — old policy log-probs, reference log-probs and values, all without gradient;
4. **rewards** — per-token ``−β·KL`` (k1 or k3 estimator) plus the score at the last real token
   (Ziegler et al. 2019, Eq. 2); β fixed or adapted towards a target KL;
5. **advantages** — GAE with a value head (PPO) or a leave-one-out / group baseline without a critic
   (RLOO, Ahmadian et al. 2024; GRPO-style normalisation, Shao et al. 2024);
6. **update** — ``ppo_epochs`` × minibatches of the clipped surrogate (+ clipped value loss), each step through
   Lightning's optimizer so every callback's ``on_before_optimizer_step`` fires.

Across ranks (DDP, FSDP2) the math is that of the global batch in one process: advantage and reward whitening
use the mean and variance of every rank's tokens; the clipped losses are token means over the minibatch of all
ranks (each micro-batch weighted by its share of those tokens); the adaptive KL controller sees the global mean KL,
so β stays equal on every rank. RLOO / GRPO baselines need no reduction: a prompt's k samples live on one rank.
Sampling differs by rank (each rank draws its own random numbers).

The pure math (GAE, baselines, the KL controller) comes first; the clipped losses, KL estimators and masked
whitening live in ``lit_align.losses``.
"""

from __future__ import annotations

import time
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from lit_align.base import AlignmentModule
from lit_align.generation import Completions, SamplingSettings
from lit_align.logprobs import position_ids
from lit_align.losses import clipped_policy_loss, clipped_value_loss, kl_penalty, masked_mean, masked_whiten
from lit_align.metrics import DIVERSITY_NAMES, Perplexity, StageMetrics
from lit_align.models import load_causal_lm, unwrap_peft
from lit_align.rewards import RewardFunction, check_reward_scores
from lit_align.rollout import RolloutMechanics


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses [B, T] (Schulman et al. 2016, Eq. 16).

    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}``, with ``V`` and ``r`` zero outside ``mask``, so
    the value after the last real token is 0 (the episode ends there). Returns ``(advantages, returns = A + V)``,
    both zero outside the mask.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def rloo_advantages(scores: Tensor, samples_per_prompt: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, Eq. 7): ``A_i = r_i − mean_{j≠i} r_j`` within each group
    of ``k`` consecutive samples of one prompt (``scores`` [N·k], grouped as ``[p0s0, p0s1, …, p1s0, …]``)."""
    k = samples_per_prompt
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = scores.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).flatten()


def group_normalized_advantages(
    scores: Tensor, samples_per_prompt: int, eps: float = 1e-4, scale: bool = True
) -> Tensor:
    """GRPO's group-normalised advantage (Shao et al. 2024, §4.1.2): ``(r − mean_group) / (std_group + eps)``,
    with the unbiased standard deviation (TRL's ``scale_rewards="group"``); ``scale=False`` keeps ``r − mean_group``
    (Dr. GRPO, Liu et al. 2025; TRL's ``scale_rewards="none"``). Shared with :mod:`lit_align.grpo`."""
    grouped = scores.view(-1, samples_per_prompt)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


class AdaptiveKLController:
    """Proportional controller for the KL coefficient β (Ziegler et al. 2019, §2.2):
    ``e = clip(KL/KL_target − 1, −0.2, 0.2)``, ``β ← β·(1 + e·n_steps/horizon)``."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10_000) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], int(state["horizon"])


# ---- the module ----------------------------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo")


class Rollout(NamedTuple):
    """One batch of sampled experience; tensors over response positions are [B, R]."""

    sequences: Tensor  # [B, P + R] left-padded prompt followed by the response
    attention_mask: Tensor  # [B, P + R]
    prompt_width: int
    response_mask: Tensor  # [B, R] 1 up to and including the first EOS
    logprobs: Tensor  # [B, R] of the policy that sampled (π_old)
    ref_logprobs: Tensor  # [B, R]
    values: Tensor | None  # [B, R] V(s_t) before each response token, or None without a critic
    advantages: Tensor  # [B, R]
    returns: Tensor | None  # [B, R]
    # (log-probs, values) of the forward that gave ``logprobs``, with its graph, for the first update to reuse
    training_forward: tuple[Tensor, Tensor | None] | None = None


class PPOModule(RolloutMechanics, AlignmentModule):
    """RLHF with PPO (value head on the policy trunk, or a separate value model) or a critic-free group baseline.

    Args:
        reward: the reward function (``lit_align.rewards``), frozen.
        kl_coef: β of the per-token KL penalty to the reference (initial value when ``adaptive_kl``). It is part of
            the reward (Ziegler et al. 2019), so with whitened advantages only β relative to the score's scale
            matters, as for the optimum of ``score − β·KL``: a reward of 1 per target token barely binds at β=0.1.
            Measured on the tiny model with every other setting at its default (``tests/test_ppo_defaults.py``),
            drift to the reference falls as β rises.
        kl_estimator: ``k1`` (log-ratio) or ``k3`` (non-negative, lower variance).
        adaptive_kl, target_kl, kl_horizon: Ziegler et al.'s controller; β moves towards ``target_kl`` (per sequence).
        sampling: how responses are sampled (:class:`~lit_align.generation.SamplingSettings`, or a dict of its
            fields; default 32 new tokens, temperature 1).
        samples_per_prompt: completions per prompt (k); the group baselines need k ≥ 2.
        advantage_estimator: ``gae`` (PPO with a critic), ``rloo`` (leave-one-out), ``grpo`` (group-normalised
            baseline inside PPO: the KL stays in the reward and is normalised with it; GRPO as published, with the
            k3 KL as a term of the loss, is :class:`~lit_align.grpo.GRPOModule`).
        gamma, lam: GAE's discount and λ.
        cliprange, cliprange_value, vf_coef: PPO's clipping of the ratio and of the value, the value-loss weight.
        ppo_epochs, num_mini_batches, gradient_accumulation_steps: passes over each rollout, minibatches per pass
            (one optimizer step each) and micro-batches per minibatch. A rollout (per-rank batch ×
            ``samples_per_prompt`` rows) must split into ``num_mini_batches`` equal minibatches, and each of those
            into ``gradient_accumulation_steps`` equal micro-batches: anything else is refused when fit starts
            (as TRL does), so every rollout makes exactly ``ppo_epochs × num_mini_batches`` optimizer steps and
            ``max_steps``, the LR schedule and callbacks count what the config says.
        max_grad_norm: gradient clipping (None: off).
        whiten_rewards: whiten the per-token rewards (mean kept) before GAE.
        whiten_advantages: whiten advantages over the batch's real tokens. None (default) = the estimator's
            own convention: on for ``gae`` (TRL's PPO), off for ``rloo`` (TRL's RLOO default: whitening would give
            a group whose samples all scored the same non-zero advantages) and off for ``grpo`` (already
            normalised per group). An explicit True/False applies to every estimator.
        missing_eos_penalty: subtracted from the score of completions that end without EOS.
        value_model: a separate model for V (Hub id / directory / alias); None puts a linear head on the policy.
        drift_texts: held-out human texts per validation for ``drift/perplexity`` (0 disables it).
        **kwargs: see :class:`~lit_align.base.AlignmentModule`.
    """

    paper: ClassVar[str] = (
        "Schulman et al. 2017, *Proximal Policy Optimization* (Eq. 7) with GAE (Schulman et al. 2016) and a "
        "KL-shaped reward (Ziegler et al. 2019); RLOO: Ahmadian et al. 2024, *Back to Basics*."
    )

    data_mode: ClassVar[str] = "prompt"
    object_arguments = ("reward",)
    metric_names = (
        "objective/scores",
        "objective/kl",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/entropy",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "val/num_eos_tokens",
        "objective/kl_coef",
        "time/generation",
        "time/scoring",
        "time/reference",
        "time/update",
        "drift/kl_to_init",
        "completions/mean_length",
        *(f"diversity/{name}" for name in DIVERSITY_NAMES),
    )
    progress_bar_metrics = ("objective/scores", "objective/kl")

    def __init__(
        self,
        reward: RewardFunction,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        adaptive_kl: bool = False,
        target_kl: float = 6.0,
        kl_horizon: int = 10_000,
        sampling: SamplingSettings = SamplingSettings(),
        samples_per_prompt: int = 1,
        advantage_estimator: str = "gae",
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        whiten_rewards: bool = False,
        whiten_advantages: bool | None = None,
        missing_eos_penalty: float | None = None,
        value_model: str | None = None,
        drift_texts: int = 64,
        **kwargs,
    ) -> None:
        if advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator={advantage_estimator!r}: choose one of {ADVANTAGE_ESTIMATORS}")
        if advantage_estimator != "gae" and samples_per_prompt < 2:
            raise ValueError(f"advantage_estimator={advantage_estimator!r} needs samples_per_prompt >= 2")
        for name, count in (
            ("samples_per_prompt", samples_per_prompt),
            ("ppo_epochs", ppo_epochs),
            ("num_mini_batches", num_mini_batches),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            if count < 1:
                raise ValueError(f"{name} must be >= 1, got {count}")
        ranges = (
            ("kl_coef", kl_coef, 0.0 <= kl_coef, ">= 0"),
            ("target_kl", target_kl, target_kl > 0, "> 0"),
            ("kl_horizon", kl_horizon, kl_horizon >= 1, ">= 1"),
            ("gamma", gamma, 0.0 <= gamma <= 1.0, "in [0, 1]"),
            ("lam", lam, 0.0 <= lam <= 1.0, "in [0, 1]"),
            ("cliprange", cliprange, cliprange > 0, "> 0"),
            ("cliprange_value", cliprange_value, cliprange_value > 0, "> 0"),
            ("vf_coef", vf_coef, vf_coef >= 0, ">= 0"),
            ("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0, "> 0 (or None: no clipping)"),
            (
                "missing_eos_penalty",
                missing_eos_penalty,
                missing_eos_penalty is None or missing_eos_penalty >= 0,
                ">= 0",
            ),
            ("drift_texts", drift_texts, drift_texts >= 0, ">= 0"),
        )
        for name, value, valid, rule in ranges:
            if not valid:  # NaN fails every comparison
                raise ValueError(f"{name} must be {rule}, got {value}")
        kl_penalty(torch.zeros(1), torch.zeros(1), kl_estimator)  # validates the estimator name early
        sampling = SamplingSettings.of(sampling)  # a dict from Python too; checked before any model loads
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=list(self.object_arguments))
        self.sampling = sampling
        self.automatic_optimization = False
        self.reward = reward.freeze() if isinstance(reward, RewardFunction) else reward
        task_scores = tuple(getattr(reward, "task_score_names", ()))  # e.g. the pivot game's drift/bleu_fr
        if task_scores:
            self.metrics = StageMetrics(self.metric_names + task_scores, self.extra_metrics())
        self.kl_controller = AdaptiveKLController(kl_coef, target_kl, kl_horizon) if adaptive_kl else None
        self.value_head: nn.Linear | None = None
        self.value_trunk: nn.Module | None = None

    def extra_metrics(self) -> dict:
        return {"drift/perplexity": Perplexity}

    @property
    def uses_critic(self) -> bool:
        return self.hparams.advantage_estimator == "gae"

    @property
    def whitens_advantages(self) -> bool:
        """``whiten_advantages``, or when None the estimator's convention (GAE yes; RLOO, GRPO no)."""
        explicit = self.hparams.whiten_advantages
        return self.hparams.advantage_estimator == "gae" if explicit is None else bool(explicit)

    @property
    def kl_coef(self) -> float:
        return self.kl_controller.value if self.kl_controller is not None else self.hparams.kl_coef

    def build_extra_modules(self) -> None:
        """The critic: a zero-initialised linear head on the policy's (or a separate model's) last hidden state."""
        if not self.uses_critic or self.value_head is not None:
            return
        if self.hparams.value_model is not None:
            self.value_trunk = load_causal_lm(self.hparams.value_model, self.hparams.dtype, self.hparams.seed)
        trunk = self.value_trunk if self.value_trunk is not None else unwrap_peft(self.policy)
        self.value_head = nn.Linear(trunk.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def extra_trainable_modules(self) -> list[nn.Module]:
        return [m for m in (self.value_head, self.value_trunk) if m is not None]

    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.ppo_epochs * self.hparams.num_mini_batches

    def rollout_split(self) -> dict[str, int]:
        """Rollouts must split into equal minibatches of equal micro-batches: ``RolloutMechanics.check_rollout_split``
        refuses anything else at setup, at train start and for each rollout."""
        return {
            "samples_per_prompt": self.hparams.samples_per_prompt,
            "num_mini_batches": self.hparams.num_mini_batches,
            "gradient_accumulation_steps": self.hparams.gradient_accumulation_steps,
        }

    # ---- forward passes over [prompt ; response] ---------------------------------------------------------------

    def response_logprobs_and_values(
        self, model: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_width: int, with_values: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs of the response tokens under ``model`` (logits / temperature, as sampled) and the values
        V(s_t) of the states before each response token."""
        wants_hidden = with_values and self.value_trunk is None
        out = self.response_logprobs_of(
            model, sequences, attention_mask, prompt_width, self.sampling.temperature, output_hidden=wants_hidden
        )
        values = None
        if with_values:
            if self.value_trunk is not None:
                hidden = self.value_trunk(
                    input_ids=sequences,
                    attention_mask=attention_mask,
                    position_ids=position_ids(attention_mask),
                    output_hidden_states=True,
                    use_cache=False,
                ).hidden_states[-1]
            else:
                hidden = out.hidden
            values = self.value_head(hidden[:, prompt_width - 1 : -1]).squeeze(-1).float()
        return out.logps, values

    def reference_response_logprobs(self, sequences: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        """Response log-probs under the reference: the frozen copy, or the policy with LoRA adapters off."""
        with self.reference_forward() as reference:
            return self.response_logprobs_and_values(reference, sequences, attention_mask, prompt_width, False)[0]

    # ---- 1. rollout --------------------------------------------------------------------------------------------

    def rollout(self, batch: dict, stage: str) -> tuple[Rollout, dict[str, Tensor]]:
        k = self.hparams.samples_per_prompt
        started = time.perf_counter()
        sample = self.sample_completions(batch, self.sampling, k)  # k per prompt, decoded (shared with GRPO)
        sequences, attention_mask, response_mask = sample.sequences, sample.attention_mask, sample.response_mask
        width, has_eos = sample.prompt_width, sample.has_eos
        generated = time.perf_counter()

        # 2. score
        scores = self.prediction_scores(sample)
        scores = sample.penalise_missing_eos(scores, self.hparams.missing_eos_penalty)
        scored = time.perf_counter()

        # 3. old log-probs and values (with gradient when the first update reuses this forward), reference log-probs
        reused = self.update_reuses_rollout_forward
        with torch.set_grad_enabled(reused):
            training_forward = self.response_logprobs_and_values(
                self.policy, sequences, attention_mask, width, self.uses_critic
            )
        logprobs, values = (t.detach() if t is not None else None for t in training_forward)
        with torch.no_grad():
            ref_logprobs = self.reference_response_logprobs(sequences, attention_mask, width)
        referenced = time.perf_counter()

        # 4. KL-shaped rewards and 5. advantages
        mask = response_mask.to(logprobs.dtype)
        kl = kl_penalty(logprobs, ref_logprobs, self.hparams.kl_estimator) * mask
        sequence_kl = kl.sum(-1)
        non_score_reward = -self.kl_coef * kl
        if self.uses_critic:
            rewards = non_score_reward.clone()
            last = response_mask.sum(-1).long().clamp_min(1) - 1
            rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
            if self.hparams.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False, sum_across_ranks=self.sum_across_ranks)
            advantages, returns = gae(rewards, values, mask, self.hparams.gamma, self.hparams.lam)
        else:
            sequence_reward = scores - self.kl_coef * sequence_kl
            baseline = rloo_advantages if self.hparams.advantage_estimator == "rloo" else group_normalized_advantages
            advantages = baseline(sequence_reward, k)[:, None] * mask
            returns = None
        if self.whitens_advantages:
            advantages = masked_whiten(advantages, mask, sum_across_ranks=self.sum_across_ranks)

        rollout = Rollout(
            sequences,
            attention_mask,
            width,
            response_mask,
            logprobs,
            ref_logprobs,
            values,
            advantages,
            returns,
            training_forward if reused else None,
        )
        stats = {
            "objective/scores": scores,
            "objective/kl": sequence_kl,
            "objective/non_score_reward": non_score_reward.sum(-1),
            "objective/rlhf_reward": scores + non_score_reward.sum(-1),
            "objective/entropy": -(logprobs * mask).sum(-1),
            "val/num_eos_tokens": has_eos.float(),
            "completions/mean_length": response_mask.sum(-1).float(),
            "time/generation": torch.tensor([generated - started]),
            "time/scoring": torch.tensor([scored - generated]),
            "time/reference": torch.tensor([referenced - scored]),
        }
        return rollout, stats

    # ---- 6. update ---------------------------------------------------------------------------------------------

    @property
    def update_reuses_rollout_forward(self) -> bool:
        """Whether the first update's forward can be the rollout's π_old forward: with one minibatch of one
        micro-batch, the first optimizer step's loss covers every row before the policy changes, so π_old is the
        current policy and the no-grad forward of step 3 would compute the same log-probs again (TRL's GRPO/RLOO
        skip it the same way). The forward then keeps its graph from step 3 to the update."""
        return self.hparams.num_mini_batches == 1 and self.hparams.gradient_accumulation_steps == 1

    def ppo_update(self, rollout: Rollout) -> dict[str, Tensor]:
        """``ppo_epochs`` passes of ``num_mini_batches`` optimizer steps (``RolloutMechanics.minibatch_updates``)."""
        tokens = rollout.response_mask.to(rollout.logprobs.dtype)
        reusable = [rollout.training_forward] if rollout.training_forward is not None else []

        def micro_step(minibatch_rows: Tensor, rows: Tensor) -> dict[str, Tensor]:
            # The losses are token means over the minibatch of all ranks: each micro-batch's mean is weighted by its
            # share of those tokens.
            tokens_per_rank = self.per_rank_share(tokens[minibatch_rows].sum()).clamp_min(1 / self.num_ranks)
            losses = self.ppo_loss(rollout, rows, reusable.pop() if reusable else None)
            self.manual_backward(losses["loss"] * tokens[rows].sum() / tokens_per_rank)
            stats = {key: losses[key].detach() for key in ("pg", "vf", "clip", "vclip", "approxkl", "ratio")}
            return {**stats, "tokens": tokens[rows].sum()}

        size = rollout.sequences.shape[0]
        stacked = self.minibatch_updates(size, self.hparams.ppo_epochs, micro_step, self.hparams.max_grad_norm)
        # Each micro-batch's token means, weighted by its tokens: the means over every token of the update, whichever
        # way the rows were cut into micro-batches and ranks (an unweighted mean of micro-batch means is not)
        tokens = stacked["tokens"]
        names = {"pg": "loss/policy_avg", "vf": "loss/value_avg", "clip": "policy/clipfrac_avg"}
        names.update({"vclip": "val/clipfrac_avg", "approxkl": "policy/approxkl_avg", "ratio": "val/ratio"})
        return {name: (stacked[key], tokens) for key, name in names.items()}

    def ppo_loss(
        self, rollout: Rollout, rows: Tensor, forward: tuple[Tensor, Tensor | None] | None = None
    ) -> dict[str, Tensor]:
        """The clipped losses of the micro-batch ``rows``; ``forward`` is the rollout's (log-probs, values) over all
        rows with their graph, when this is the first update and it can be reused."""
        mask = rollout.response_mask[rows]
        if forward is not None:
            logprobs, values = (t[rows] if t is not None else None for t in forward)
        else:
            logprobs, values = self.response_logprobs_and_values(
                self.policy,
                rollout.sequences[rows],
                rollout.attention_mask[rows],
                rollout.prompt_width,
                self.uses_critic,
            )
        old = rollout.logprobs[rows]
        policy = clipped_policy_loss(logprobs, old, rollout.advantages[rows], mask, self.hparams.cliprange)
        loss, value_loss, value_clipfrac = policy.loss, torch.zeros(()), torch.zeros(())
        if self.uses_critic:
            value = clipped_value_loss(
                values, rollout.values[rows], rollout.returns[rows], mask, self.hparams.cliprange_value
            )
            loss = loss + self.hparams.vf_coef * value.loss
            value_loss, value_clipfrac = value.loss, value.clipfrac
        log_ratio = (logprobs - old).detach()
        return {
            "loss": loss,
            "pg": policy.loss,
            "vf": value_loss,
            "clip": policy.clipfrac,
            "vclip": value_clipfrac,
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(log_ratio.exp(), mask),
        }

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rollout, stats = self.rollout(batch, "train")
        started = time.perf_counter()
        stats.update(self.ppo_update(rollout))
        stats["time/update"] = torch.tensor([time.perf_counter() - started])
        if self.kl_controller is not None:  # on the global batch, so β stays the same on every rank
            total, count = self.sum_and_count_across_ranks(stats["objective/kl"])
            self.kl_controller.update(float(total / count), int(count))
        stats["objective/kl_coef"] = torch.tensor([self.kl_coef])
        if not torch.isfinite(stats["loss/policy_avg"][0]).all():
            raise FloatingPointError(
                f"PPOModule: non-finite policy loss at global step {self.global_step}; stopping. "
                "Lower the learning rate or check the reward."
            )
        self.log_values("train", stats, batch_size=rollout.sequences.shape[0])

    # ---- validation: reward and drift ------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, "test")

    @torch.no_grad()
    def evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        """Reward and drift of fresh samples: ``objective/scores``, ``drift/kl_to_init`` (Σ_t log π − log π_ref
        over sampled tokens, a k1 estimate of KL(π‖π_ref)) and, once per epoch, ``drift/perplexity`` of the
        policy on held-out human text."""
        sample = self.sample_completions(batch, self.sampling)
        scores = self.prediction_scores(sample)
        task_scores = (
            self.reward.task_scores(sample.prompts, sample.completions, sample.batch)
            if hasattr(self.reward, "task_scores")
            else {}
        )
        values = {**task_scores, "objective/scores": scores, **self.sample_drift(sample, self.sampling.temperature)}
        self.log_values(stage, values, batch_size=scores.shape[0])
        if batch_idx == 0:
            self.log_heldout_perplexity(stage, self.hparams.drift_texts)
            self.log_completions(stage, sample.prompts, sample.completions, reward=scores)

    def prediction_scores(self, sample: Completions) -> Tensor:
        """The reward of each sampled completion (checked: one finite number each, blamed on the reward if not)."""
        scores = self.reward(sample.prompts, sample.completions, sample.batch)
        return check_reward_scores(scores, self.reward, sample.completions, sample.batch).to(self.device)

    # ---- state that must survive a checkpoint ------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.kl_controller is not None:
            checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.kl_controller is not None and "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
