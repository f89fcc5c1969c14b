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
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.keys import PROMPT_ATTENTION_MASK, PROMPT_INPUT_IDS
from lit_align.base import AlignmentModule
from lit_align.generation import SamplingSettings, decode_responses
from lit_align.logprobs import position_ids, response_logprobs, token_logprobs
from lit_align.losses import clipped_policy_loss, clipped_value_loss, kl_penalty, masked_mean, masked_whiten
from lit_align.metrics import DIVERSITY_NAMES, Perplexity, StageMetrics, diversity_scores
from lit_align.models import load_causal_lm, unwrap_peft
from lit_align.rewards import RewardFunction


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


def group_normalized_advantages(scores: Tensor, samples_per_prompt: int, eps: float = 1e-4) -> Tensor:
    """GRPO's group-normalised advantage (Shao et al. 2024, §4.1.2): ``(r − mean_group) / (std_group + eps)``,
    with the unbiased standard deviation (TRL's ``scale_rewards="group"``)."""
    grouped = scores.view(-1, samples_per_prompt)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).flatten()


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


class PPOModule(AlignmentModule):
    """RLHF with PPO (value head on the policy trunk, or a separate value model) or a critic-free group baseline.

    Args:
        reward: the reward function (``lit_align.rewards``), frozen.
        kl_coef: β of the per-token KL penalty to the reference (initial value when ``adaptive_kl``).
        kl_estimator: ``k1`` (log-ratio) or ``k3`` (non-negative, lower variance).
        adaptive_kl, target_kl, kl_horizon: Ziegler et al.'s controller; β moves towards ``target_kl`` (per sequence).
        sampling: how responses are sampled (:class:`~lit_align.generation.SamplingSettings`, or a dict of its
            fields; default 32 new tokens, temperature 1).
        samples_per_prompt: completions per prompt (k); the group baselines need k ≥ 2.
        advantage_estimator: ``gae`` (PPO with a critic), ``rloo`` (leave-one-out), ``grpo`` (group-normalised).
        gamma, lam: GAE's discount and λ.
        cliprange, cliprange_value, vf_coef: PPO's clipping of the ratio and of the value, the value-loss weight.
        ppo_epochs, num_mini_batches, gradient_accumulation_steps: passes over each rollout, minibatches per pass
            (one optimizer step each) and micro-batches per minibatch.
        max_grad_norm: gradient clipping (None: off).
        whiten_rewards: whiten the per-token rewards (mean kept) before GAE.
        whiten_advantages: whiten advantages over the batch's real tokens.
        missing_eos_penalty: subtracted from the score of completions that end without EOS.
        value_model: a separate model for V (Hub id / directory / alias); None puts a linear head on the policy.
        drift_texts: held-out human texts per validation for ``drift/perplexity`` (0 disables it).
        **kwargs: see :class:`~lit_align.base.AlignmentModule`.
    """

    data_mode: ClassVar[str] = "prompt"
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
        whiten_advantages: bool = True,
        missing_eos_penalty: float | None = None,
        value_model: str | None = None,
        drift_texts: int = 64,
        **kwargs,
    ) -> None:
        if advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator={advantage_estimator!r}: choose one of {ADVANTAGE_ESTIMATORS}")
        if advantage_estimator != "gae" and samples_per_prompt < 2:
            raise ValueError(f"advantage_estimator={advantage_estimator!r} needs samples_per_prompt >= 2")
        kl_penalty(torch.zeros(1), torch.zeros(1), kl_estimator)  # validates the estimator name early
        sampling = SamplingSettings.of(sampling)  # a dict from Python too; checked before any model loads
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["reward"])
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

    # ---- forward passes over [prompt ; response] ---------------------------------------------------------------

    def response_logprobs_and_values(
        self, model: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_width: int, with_values: bool
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Log-probs of the response tokens under ``model`` (logits / temperature, as sampled), the values
        V(s_t) of the states before each response token, and the per-token logits' entropy."""
        wants_hidden = with_values and self.value_trunk is None
        logprobs, logits, out = response_logprobs(
            model, sequences, attention_mask, prompt_width, self.sampling.temperature, wants_hidden
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
                hidden = out.hidden_states[-1]
            values = self.value_head(hidden[:, prompt_width - 1 : -1]).squeeze(-1).float()
        return logprobs, values, logits

    def reference_response_logprobs(self, sequences: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        """Response log-probs under the reference: the frozen copy, or the policy with LoRA adapters off."""
        with self.reference_forward() as reference:
            return self.response_logprobs_and_values(reference, sequences, attention_mask, prompt_width, False)[0]

    # ---- 1. rollout --------------------------------------------------------------------------------------------

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sample responses from the policy; (sequences, attention mask, response mask up to and including EOS)."""
        return self.generate_responses(self.policy, prompt_ids, prompt_mask, self.sampling)

    def decode(self, sequences: Tensor, prompt_width: int, response_mask: Tensor) -> tuple[list[str], list[str]]:
        return decode_responses(self.tokenizer, sequences, prompt_width, response_mask)

    def rollout(self, batch: dict, stage: str) -> tuple[Rollout, dict[str, Tensor]]:
        k = self.hparams.samples_per_prompt
        prompt_ids = batch[PROMPT_INPUT_IDS].repeat_interleave(k, dim=0)
        prompt_mask = batch[PROMPT_ATTENTION_MASK].repeat_interleave(k, dim=0)
        width = prompt_ids.shape[1]
        reward_batch = {key: repeat_rows(value, k) for key, value in batch.items()}

        started = time.perf_counter()
        sequences, attention_mask, response_mask = self.generate(prompt_ids, prompt_mask)
        generated = time.perf_counter()

        # 2. score
        prompts, completions = self.decode(sequences, width, response_mask)
        scores = self.reward(prompts, completions, reward_batch).to(self.device)
        has_eos = (sequences[:, width:] == self.tokenizer.eos_token_id).logical_and(response_mask.bool()).any(-1)
        if self.hparams.missing_eos_penalty is not None:
            scores = scores - self.hparams.missing_eos_penalty * (~has_eos).float()
        scored = time.perf_counter()

        # 3. old log-probs, reference log-probs and values, without gradient
        with torch.no_grad():
            logprobs, values, logits = self.response_logprobs_and_values(
                self.policy, sequences, attention_mask, width, self.uses_critic
            )
            ref_logprobs = self.reference_response_logprobs(sequences, attention_mask, width)
            del logits
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
        if self.hparams.whiten_advantages:
            advantages = masked_whiten(advantages, mask, sum_across_ranks=self.sum_across_ranks)

        rollout = Rollout(
            sequences, attention_mask, width, response_mask, logprobs, ref_logprobs, values, advantages, returns
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

    def ppo_update(self, rollout: Rollout) -> dict[str, Tensor]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        size = rollout.sequences.shape[0]
        minibatch = max(1, size // self.hparams.num_mini_batches)
        micro = max(1, minibatch // self.hparams.gradient_accumulation_steps)
        history: dict[str, list[Tensor]] = {k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl", "ratio")}
        tokens = rollout.response_mask.to(rollout.logprobs.dtype)
        for _ in range(self.hparams.ppo_epochs):
            order = torch.randperm(size, device=rollout.sequences.device)
            for minibatch_rows in order.split(minibatch):
                # The losses are token means over the minibatch of all ranks: each micro-batch's mean is weighted
                # by its share of those tokens.
                tokens_per_rank = self.per_rank_share(tokens[minibatch_rows].sum()).clamp_min(1 / self.num_ranks)
                for rows in minibatch_rows.split(micro):
                    losses = self.ppo_loss(rollout, rows)
                    self.manual_backward(losses["loss"] * tokens[rows].sum() / tokens_per_rank)
                    for key in history:
                        history[key].append(losses[key].detach())
                if self.hparams.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm)
                optimizer.step()
                self.call_callbacks("on_after_optimizer_step")
                optimizer.zero_grad()
                if scheduler is not None:
                    scheduler.step()
        stacked = {key: torch.stack(values) for key, values in history.items()}
        return {
            "loss/policy_avg": stacked["pg"],
            "loss/value_avg": stacked["vf"],
            "policy/clipfrac_avg": stacked["clip"],
            "val/clipfrac_avg": stacked["vclip"],
            "policy/approxkl_avg": stacked["approxkl"],
            "val/ratio": stacked["ratio"],
        }

    def ppo_loss(self, rollout: Rollout, rows: Tensor) -> dict[str, Tensor]:
        mask = rollout.response_mask[rows]
        logprobs, values, _ = self.response_logprobs_and_values(
            self.policy, rollout.sequences[rows], rollout.attention_mask[rows], rollout.prompt_width, self.uses_critic
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
        if not torch.isfinite(stats["loss/policy_avg"]).all():
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
        prompt_ids, prompt_mask = batch[PROMPT_INPUT_IDS], batch[PROMPT_ATTENTION_MASK]
        width = prompt_ids.shape[1]
        sequences, attention_mask, response_mask = self.generate(prompt_ids, prompt_mask)
        prompts, completions = self.decode(sequences, width, response_mask)
        scores = self.reward(prompts, completions, batch).to(self.device)
        logprobs, _, _ = self.response_logprobs_and_values(self.policy, sequences, attention_mask, width, False)
        ref_logprobs = self.reference_response_logprobs(sequences, attention_mask, width)
        mask = response_mask.to(logprobs.dtype)
        task_scores = (
            self.reward.task_scores(prompts, completions, batch) if hasattr(self.reward, "task_scores") else {}
        )
        self.log_values(
            stage,
            {
                **task_scores,
                "objective/scores": scores,
                "drift/kl_to_init": ((logprobs - ref_logprobs) * mask).sum(-1),
                "completions/mean_length": mask.sum(-1),
                **{f"diversity/{name}": torch.tensor([v]) for name, v in diversity_scores(completions).items()},
            },
            batch_size=scores.shape[0],
        )
        if batch_idx == 0:
            self.log_heldout_perplexity(stage)

    def log_heldout_perplexity(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if self.hparams.drift_texts <= 0 or not hasattr(datamodule, "heldout_texts"):
            return
        texts = datamodule.heldout_texts(self.hparams.drift_texts)
        texts = texts[self.trainer.global_rank :: self.trainer.world_size]  # each rank its share; sums sync
        if not texts:
            rank_zero_warn("drift/perplexity: no held-out texts on this rank")
            return
        metric = self.metrics.get(stage, "drift/perplexity")
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=128)["input_ids"]
        for start in range(0, len(encoded), 8):
            rows = [torch.tensor(r, dtype=torch.long, device=self.device) for r in encoded[start : start + 8]]
            ids = torch.nn.utils.rnn.pad_sequence(
                rows, batch_first=True, padding_value=self.tokenizer.eos_token_id, padding_side="right"
            )
            attention = torch.nn.utils.rnn.pad_sequence(
                [torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="right"
            )
            logits = self.policy(input_ids=ids, attention_mask=attention, use_cache=False).logits
            metric.update(token_logprobs(logits[:, :-1], ids[:, 1:]), attention[:, 1:])
        self.log(self.metrics.log_name(stage, "drift/perplexity"), metric, on_step=False, on_epoch=True)

    # ---- state that must survive a checkpoint ------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.kl_controller is not None:
            checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.kl_controller is not None and "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])


def repeat_rows(value, k: int):
    """Repeat each row k times (tensors along dim 0, lists element-wise), matching ``repeat_interleave``."""
    if torch.is_tensor(value):
        return value.repeat_interleave(k, dim=0)
    if isinstance(value, list):
        return [item for item in value for _ in range(k)]
    return value
