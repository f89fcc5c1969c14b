"""GRPO, Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", §4.1), as published and as TRL's
``GRPOTrainer`` runs it.

The file reads in the order of one iteration (one ``training_step`` = one rollout batch):

1. **rollout** — ``num_generations`` (G) completions per prompt from the policy
   (``RolloutMechanics.sample_completions``, shared with PPO);
2. **score** — every reward function on the decoded texts, weighted and summed (``reward_weights``; a ``None`` score
   is NaN and left out of the sum, as in TRL), minus ``missing_eos_penalty`` for completions without EOS;
3. **group advantages** — ``Â_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)`` for every token of completion i
   (§4.1.2, outcome supervision); ``scale_rewards=False`` keeps ``r_i − mean(r_group)`` (Dr. GRPO);
4. **loss** — the clipped surrogate with ε_low / ε_high plus ``β · KL`` to the reference *in the loss*, KL by the k3
   estimator (the paper's Eq. 3 and 4), reduced over tokens as ``loss_type`` says;
5. **step** — ``num_iterations`` (μ) passes × ``num_mini_batches`` optimizer steps over each rollout, each through
   Lightning's optimizer so every callback sees it (``RolloutMechanics.minibatch_updates``, shared with PPO).

How this differs from ``PPOModule(advantage_estimator="grpo")``: PPO folds a k1 KL into the reward before the
group normalisation (the KL then shapes the advantage) and optimises PPO's token-mean surrogate; here the reward is
the score alone and β·k3 is its own term of the loss, with the paper's per-sequence aggregation by default.

Defaults follow the paper's reported runs (§4.2: β = 0.04, G = 64, one update per rollout so μ = 1; the
per-sequence ``loss_type="grpo"`` of Eq. 3); TRL's current defaults differ (β = 0, G = 8, ``loss_type="dapo"``) and
are one argument away. ε = 0.2 is TRL's (the paper gives none).

Across ranks (DDP, FSDP2) the loss is that of the global minibatch in one process: each micro-batch's share is
weighted by its part of the minibatch's sequences (``grpo``, ``dr_grpo``) or tokens (``dapo``) over all ranks;
``bnpo`` normalises each rank's micro-batch by its own tokens, as TRL does. A prompt's G samples live on one rank, so
the group statistics need no reduction.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.keys import PROMPT, PROMPT_MESSAGES, REWARD_FUNCTION_ARGUMENTS
from lit_align.base import AlignmentModule
from lit_align.generation import Completions, SamplingSettings
from lit_align.losses import kl_penalty, masked_mean
from lit_align.metrics import DIVERSITY_NAMES, Perplexity, StageMetrics
from lit_align.ppo import group_normalized_advantages
from lit_align.rewards import RewardFunction, check_reward_scores
from lit_align.rollout import RolloutMechanics

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


# ---- the pure math ------------------------------------------------------------------------------------------------


def grpo_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> Tensor:
    """Per-token GRPO loss ``[B, T]``, the paper's Eq. 3 negated for minimisation (TRL's ``_compute_loss``):

    ``ℓ_t = −min(ρ_t·Â, clip(ρ_t, 1 − ε_low, 1 + ε_high)·Â) + β·D_t`` with ``ρ_t = π_θ(o_t)/π_old(o_t)`` and the k3
    estimator ``D_t = π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(ref − logp) − (ref − logp) − 1`` (Eq. 4; ≥ 0, unbiased
    for KL(π_θ‖π_ref) under samples of π_θ). The gradient flows through ``logprobs`` only: ∂D_t/∂logp =
    1 − π_ref/π_θ pushes log π_θ back towards log π_ref. ``epsilon_high`` None = ``epsilon_low`` (symmetric; DAPO's
    "clip-higher" uses 0.28). ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``; ``ref_logprobs`` is only
    read when β ≠ 0.
    """
    advantages = advantages if advantages.dim() == logprobs.dim() else advantages.unsqueeze(-1)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if beta != 0.0:
        loss = loss + beta * kl_penalty(logprobs, ref_logprobs, "k3")
    return loss


def aggregate_loss(
    per_token_loss: Tensor, mask: Tensor, loss_type: str = "grpo", max_completion_length: int | None = None
) -> Tensor:
    """Reduce per-token losses ``[B, T]`` over the completion tokens (``mask``) of one batch, as TRL's GRPOTrainer
    defines its ``loss_type`` values (``trl/trainer/grpo_trainer.py``, ``_compute_loss``; ``GRPOConfig.loss_type``):

    * ``grpo`` — ``(1/B) Σ_i (1/|o_i|) Σ_t ℓ_it``: every sequence weighs the same (the paper's Eq. 3);
    * ``bnpo``, ``dapo`` — ``Σ_i Σ_t ℓ_it / Σ_i |o_i|``: every token weighs the same (DAPO's token-level loss, Yu
      et al. 2025); on one batch they coincide — they differ in which batch (see ``GRPOModule.micro_batch_share``);
    * ``dr_grpo`` — ``Σ_i Σ_t ℓ_it / (B · L_max)`` with ``L_max = max_completion_length``, a constant (Dr. GRPO, Liu et
      al. 2025, removes the length bias of 1/|o_i|).

    A sequence without tokens counts as length 1 (TRL's ``clamp(min=1)``).
    """
    mask = mask.to(per_token_loss.dtype)
    summed = (per_token_loss * mask).sum(-1)  # [B]
    if loss_type == "grpo":
        return (summed / mask.sum(-1).clamp_min(1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return summed.sum() / mask.sum().clamp_min(1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return summed.sum() / (per_token_loss.shape[0] * max_completion_length)
    raise ValueError(f"loss_type={loss_type!r}: choose one of {LOSS_TYPES}")


def clip_fractions(
    ratio: Tensor, advantages: Tensor, mask: Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Fractions of completion tokens whose clipped branch is active, TRL's ``clip_ratio/{low,high,region}_mean``:
    low = ``ρ < 1 − ε_low`` with ``Â < 0``, high = ``ρ > 1 + ε_high`` with ``Â > 0``, region = either."""
    advantages = advantages if advantages.dim() == ratio.dim() else advantages.unsqueeze(-1)
    low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return masked_mean(low.float(), mask), masked_mean(high.float(), mask), masked_mean((low | high).float(), mask)


# ---- reward functions --------------------------------------------------------------------------------------------


def resolve_reward_function(value: Callable | str) -> Callable:
    """A reward function, or the import path of one (``"my_pkg.rewards.length_reward"``)."""
    if not isinstance(value, str):
        if not callable(value):
            raise TypeError(f"a reward function must be callable, got {type(value).__name__}")
        return value
    module_name, _, attribute = value.rpartition(".")
    if not module_name:
        raise ValueError(f"reward function {value!r} is not an import path like 'package.module.function'")
    return getattr(importlib.import_module(module_name), attribute)


def reward_function_name(func: Callable) -> str:
    """TRL's name for a reward function in ``rewards/<name>/mean``: a function's ``__name__``, else the class name."""
    func = getattr(func, "func", func)  # functools.partial
    name = func.__name__ if hasattr(func, "__name__") else type(func).__name__
    return name.replace(".", "_")  # metric keys may not hold dots


# ---- the module ----------------------------------------------------------------------------------------------


class GRPORollout(NamedTuple):
    """One batch of sampled experience; tensors over response positions are ``[N, R]`` (N = prompts × G)."""

    sequences: Tensor  # [N, P + R] left-padded prompt followed by the response
    attention_mask: Tensor  # [N, P + R]
    prompt_width: int
    response_mask: Tensor  # [N, R] 1 up to and including the first EOS
    advantages: Tensor  # [N] one group-normalised advantage per completion
    old_logprobs: Tensor | None  # [N, R] of the sampling policy; None when μ = 1 and one minibatch (ρ ≡ 1)
    ref_logprobs: Tensor | None  # [N, R]; None when β = 0


class GRPOModule(RolloutMechanics, AlignmentModule):
    """GRPO with the KL to the reference in the loss (Shao et al. 2024), and the variants TRL offers.

    Args:
        reward_funcs: reward functions, summed: TRL's signature ``f(prompts=..., completions=..., **columns) ->
            list[float | None]`` (``columns``: the batch's string columns such as ``reference``, or your own
            data's other columns, repeated per completion, and ``completion_ids``; conversational data gives
            ``prompts`` as message lists and each completion as ``[{"role": "assistant", "content": ...}]``), or
            the library's reward modules (:mod:`lit_align.rewards`, called as ``reward(prompts, completions,
            batch)``). From YAML give an import path (``my_pkg.rewards.length``) or
            a ``class_path`` object per item.
        reward_weights: one weight per reward function (default 1 each).
        beta: β, the coefficient of the k3 KL term in the loss (paper: 0.04; TRL: 0). β = 0 drops the term and the
            reference model with it: none is built, and evaluation logs no ``drift/kl_to_init``.
        num_generations: completions per prompt (G ≥ 2) forming one group (paper: 64; TRL: 8).
        sampling: how completions are sampled (:class:`~lit_align.generation.SamplingSettings` or a dict of its
            fields); ``max_new_tokens`` is ``dr_grpo``'s constant ``L_max``.
        scale_rewards: divide the centred rewards by the group's standard deviation (+1e-4) as the paper does; False
            keeps only the centring (Dr. GRPO: the std scaling biases towards too-easy and too-hard prompts).
        loss_type: ``grpo`` (per-sequence token mean, then the mean over sequences — the paper), ``dapo`` (token-level
            over the optimizer step's whole minibatch of all ranks — DAPO, TRL's default), ``bnpo`` (token-level over
            each rank's micro-batch — TRL's ``bnpo``), ``dr_grpo`` (token sum / (sequences × max_new_tokens)).
        epsilon, epsilon_high: the clipping range ``[1 − ε, 1 + ε_high]`` of the ratio; ``epsilon_high`` None = ε.
        num_iterations: μ, passes over each rollout (μ = 1 with one minibatch: ρ = 1 and π_old is the current policy
            detached, so the surrogate's gradient is the plain policy gradient, as in TRL).
        num_mini_batches, gradient_accumulation_steps: minibatches per pass (one optimizer step each) and
            micro-batches per minibatch; a rollout (per-rank batch × G) must split evenly.
        max_grad_norm: gradient clipping (None: off).
        missing_eos_penalty: subtracted from the summed reward of completions that end without EOS.
        drift_texts: held-out human texts per validation for ``drift/perplexity`` (0 disables it).
        **kwargs: see :class:`~lit_align.base.AlignmentModule`.

    Logged with TRL's names: ``reward``, ``reward_std`` (mean within-group std), ``frac_reward_zero_std``,
    ``rewards/<function>/mean``, ``kl`` (token mean of k3, β ≠ 0), ``entropy``, ``clip_ratio/{low,high,region}_mean``,
    ``completions/{mean_length,clipped_ratio,mean_terminated_length}``, ``loss``; evaluation (one sample per prompt)
    logs ``reward``, ``rewards/<function>/mean``, ``drift/kl_to_init``, ``drift/perplexity``, ``diversity/*``.
    """

    paper: ClassVar[str] = (
        "Shao et al. 2024, *DeepSeekMath* (GRPO, §4.1); loss aggregations of DAPO (Yu et al. 2025) and Dr. "
        "GRPO (Liu et al. 2025)."
    )

    data_mode: ClassVar[str] = "prompt"
    object_arguments = ("reward_funcs",)
    metric_names = (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "loss",
        "kl",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "completions/mean_terminated_length",
        "time/generation",
        "time/scoring",
        "time/reference",
        "time/update",
        "drift/kl_to_init",
        *(f"diversity/{name}" for name in DIVERSITY_NAMES),
    )
    progress_bar_metrics = ("reward", "kl")

    def __init__(
        self,
        reward_funcs: list[Callable] | Callable,
        reward_weights: list[float] | None = None,
        beta: float = 0.04,
        num_generations: int = 64,
        sampling: SamplingSettings = SamplingSettings(),
        scale_rewards: bool = True,
        loss_type: str = "grpo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_iterations: int = 1,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        missing_eos_penalty: float | None = None,
        drift_texts: int = 64,
        **kwargs,
    ) -> None:
        funcs = [
            resolve_reward_function(f) for f in (reward_funcs if isinstance(reward_funcs, list) else [reward_funcs])
        ]
        weights = [1.0] * len(funcs) if reward_weights is None else [float(w) for w in reward_weights]
        problems = []
        if not funcs:
            problems.append("reward_funcs is empty")
        if len(weights) != len(funcs):
            problems.append(f"{len(weights)} reward_weights for {len(funcs)} reward_funcs")
        if loss_type not in LOSS_TYPES:
            problems.append(f"loss_type={loss_type!r}: choose one of {LOSS_TYPES}")
        if num_generations < 2:
            problems.append(f"num_generations must be >= 2 (a group needs several samples), got {num_generations}")
        if not beta >= 0:
            problems.append(f"beta must be >= 0, got {beta}")
        if not 0 < epsilon < 1:
            problems.append(f"epsilon must be in (0, 1), got {epsilon}")
        if epsilon_high is not None and epsilon_high < 0:
            problems.append(f"epsilon_high must be >= 0, got {epsilon_high}")
        for name, count in (
            ("num_iterations", num_iterations),
            ("num_mini_batches", num_mini_batches),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            if count < 1:
                problems.append(f"{name} must be >= 1, got {count}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0 (or None: no clipping), got {max_grad_norm}")
        if missing_eos_penalty is not None and not missing_eos_penalty >= 0:
            problems.append(f"missing_eos_penalty must be >= 0 (it is subtracted), got {missing_eos_penalty}")
        if drift_texts < 0:
            problems.append(f"drift_texts must be >= 0, got {drift_texts}")
        if problems:
            raise ValueError("GRPOModule: " + "; ".join(problems))
        sampling = SamplingSettings.of(sampling)  # a dict from Python too; checked before any model loads
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=list(self.object_arguments))
        self.sampling = sampling
        self.automatic_optimization = False
        self.uses_reference = beta != 0.0  # β = 0: no reference copy is built (AlignmentModule.build_models)
        for func in funcs:
            if isinstance(func, RewardFunction):
                func.freeze()
            elif isinstance(func, nn.Module):
                func.requires_grad_(False).eval()
        self.reward_funcs = funcs
        self.reward_modules = nn.ModuleList([f for f in funcs if isinstance(f, nn.Module)])  # moved with the module
        self.reward_weights = torch.tensor(weights)
        names = [reward_function_name(f) for f in funcs]
        self.reward_func_names = [
            n if names.count(n) == 1 else f"{n}_{names[:i].count(n)}" for i, n in enumerate(names)
        ]
        task_scores = tuple(name for f in funcs for name in getattr(f, "task_score_names", ()))
        per_function = tuple(f"rewards/{name}/mean" for name in self.reward_func_names)
        self.metrics = StageMetrics(self.metric_names + per_function + task_scores, self.extra_metrics())

    def extra_metrics(self) -> dict:
        return {"drift/perplexity": Perplexity}

    def train(self, mode: bool = True) -> GRPOModule:
        super().train(mode)
        self.reward_modules.eval()  # rewards stay frozen whatever Lightning sets
        return self

    def rollout_split(self) -> dict[str, int]:
        return {
            "num_generations": self.hparams.num_generations,
            "num_mini_batches": self.hparams.num_mini_batches,
            "gradient_accumulation_steps": self.hparams.gradient_accumulation_steps,
        }

    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.num_iterations * self.hparams.num_mini_batches

    @property
    def keeps_old_logprobs(self) -> bool:
        """Whether π_old must be recorded at rollout time: the policy changes before some row's loss is taken (μ > 1
        or several minibatches). Otherwise π_old is the current policy detached, as in TRL."""
        return self.hparams.num_iterations > 1 or self.hparams.num_mini_batches > 1

    # ---- 1. rollout ---------------------------------------------------------------------------------------------

    def rollout(self, batch: dict) -> tuple[GRPORollout, dict[str, Tensor]]:
        G = self.hparams.num_generations
        started = time.perf_counter()
        sample = self.sample_completions(batch, self.sampling, G)
        generated = time.perf_counter()

        # 2. score: r_i = Σ_f w_f · r_f(o_i), a None score left out of the sum (TRL's nansum)
        per_function = self.score(sample)  # [N, F]
        rewards = sample.penalise_missing_eos(self.summed_rewards(per_function), self.hparams.missing_eos_penalty)
        scored = time.perf_counter()

        # 3. group advantages: Â_i = (r_i − mean_group) / (std_group + 1e-4), the same for every token of o_i
        advantages = group_normalized_advantages(rewards, G, scale=self.hparams.scale_rewards)
        group_std = rewards.view(-1, G).std(dim=1)

        # π_old (when the policy moves before the loss is taken) and π_ref (when β ≠ 0), without gradient
        args = (sample.sequences, sample.attention_mask, sample.prompt_width, self.sampling.temperature)
        with torch.no_grad():
            old_logprobs = self.response_logprobs_of(self.policy, *args).logps if self.keeps_old_logprobs else None
            ref_logprobs = None
            if self.hparams.beta != 0.0:
                with self.reference_forward() as reference:
                    ref_logprobs = self.response_logprobs_of(reference, *args).logps
        referenced = time.perf_counter()

        rollout = GRPORollout(
            sample.sequences,
            sample.attention_mask,
            sample.prompt_width,
            sample.response_mask,
            advantages,
            old_logprobs,
            ref_logprobs,
        )
        lengths = sample.response_mask.sum(-1).float()
        stats = {
            "reward": rewards,
            "reward_std": group_std,
            "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float(),
            **self.per_function_means(per_function),
            "completions/mean_length": lengths,
            "completions/clipped_ratio": (~sample.has_eos).float(),
            "completions/mean_terminated_length": lengths[sample.has_eos],
            "time/generation": torch.tensor([generated - started]),
            "time/scoring": torch.tensor([scored - generated]),
            "time/reference": torch.tensor([referenced - scored]),
        }
        return rollout, stats

    # ---- 2. score -----------------------------------------------------------------------------------------------

    def score(self, sample: Completions) -> Tensor:
        """``[N, F]``: each reward function's score of each completion (NaN where a function returned None)."""
        width = sample.prompt_width
        passed_otherwise = (PROMPT, PROMPT_MESSAGES, *REWARD_FUNCTION_ARGUMENTS)
        columns = {k: v for k, v in sample.batch.items() if isinstance(v, list) and k not in passed_otherwise}
        # conversational data: TRL passes the prompt's messages and each completion as one assistant message
        prompts, completions = sample.prompts, sample.completions
        if PROMPT_MESSAGES in sample.batch:
            prompts = sample.batch[PROMPT_MESSAGES]
            completions = [[{"role": "assistant", "content": text}] for text in sample.completions]
        completion_ids = [
            row[mask.bool()].tolist()
            for row, mask in zip(sample.sequences[:, width:], sample.response_mask, strict=True)
        ]
        scores = []
        for name, func in zip(self.reward_func_names, self.reward_funcs, strict=True):
            if isinstance(func, RewardFunction):
                values = func(sample.prompts, sample.completions, sample.batch)
            else:
                values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            # one number per completion, None (the function does not apply: TRL) becomes NaN; anything else raises
            column = check_reward_scores(values, func, sample.completions, sample.batch, allow_none=True, name=name)
            scores.append(column.cpu())
        return torch.stack(scores, dim=1).to(self.device)

    def prediction_scores(self, sample: Completions) -> Tensor:
        """The weighted sum of the reward functions for each predicted completion."""
        return self.summed_rewards(self.score(sample))

    def summed_rewards(self, per_function: Tensor) -> Tensor:
        """``Σ_f w_f · r_f`` over ``[N, F]`` scores, a NaN (None) left out of the sum, as TRL's ``nansum``."""
        missing = per_function.isnan().all(dim=1)
        if missing.any():
            rank_zero_warn(
                f"GRPOModule: every reward function returned None for {int(missing.sum())} completion(s); "
                "their reward is 0"
            )
        return (per_function * self.reward_weights.to(per_function.device)).nansum(dim=1)

    def per_function_means(self, per_function: Tensor) -> dict[str, Tensor]:
        """``rewards/<name>/mean`` over the completions each function scored (NaN left out, as TRL's nanmean)."""
        return {
            f"rewards/{name}/mean": column[~column.isnan()]
            for name, column in zip(self.reward_func_names, per_function.unbind(1), strict=True)
        }

    # ---- 4. loss ------------------------------------------------------------------------------------------------

    def grpo_loss(self, rollout: GRPORollout, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``loss_type`` aggregate of the per-token loss over the micro-batch ``rows``, and detached statistics."""
        mask = rollout.response_mask[rows].float()
        logprobs, entropy, _ = self.response_logprobs_of(
            self.policy,
            rollout.sequences[rows],
            rollout.attention_mask[rows],
            rollout.prompt_width,
            self.sampling.temperature,
            with_entropy=True,
        )
        # μ = 1 with one minibatch: π_old = π_θ detached, so ρ = 1 and ∇ρ = ∇log π_θ (TRL)
        old = rollout.old_logprobs[rows] if rollout.old_logprobs is not None else logprobs.detach()
        ref = rollout.ref_logprobs[rows] if rollout.ref_logprobs is not None else None
        advantages = rollout.advantages[rows]
        epsilon, epsilon_high = self.hparams.epsilon, self.epsilon_high
        per_token = grpo_token_loss(logprobs, old, advantages, ref, self.hparams.beta, epsilon, epsilon_high)
        loss = aggregate_loss(per_token, mask, self.hparams.loss_type, self.sampling.max_new_tokens)
        with torch.no_grad():
            low, high, region = clip_fractions(torch.exp(logprobs - old), advantages, mask, epsilon, epsilon_high)
            stats = {
                "loss": loss.detach(),
                "entropy": masked_mean(entropy, mask),
                "clip_ratio/low_mean": low,
                "clip_ratio/high_mean": high,
                "clip_ratio/region_mean": region,
                "tokens": mask.sum(),
            }
            if ref is not None:
                stats["kl"] = masked_mean(kl_penalty(logprobs, ref, "k3"), mask)
        return loss, stats

    @property
    def epsilon_high(self) -> float:
        return self.hparams.epsilon if self.hparams.epsilon_high is None else self.hparams.epsilon_high

    def micro_batch_share(self, mask: Tensor, minibatch: Tensor, micro: Tensor) -> Tensor:
        """The factor on one micro-batch's ``aggregate_loss`` before backward, so that the micro-batches' gradients,
        summed here and averaged over ranks by DDP / FSDP, are those of the loss over the whole minibatch of all
        ranks — TRL's normalisers: ``grpo`` / ``dr_grpo`` count sequences, ``dapo`` tokens of the minibatch (TRL:
        "the global accumulated batch"), ``bnpo`` each micro-batch's own tokens (TRL: "the local batch"), so its
        micro-batches are averaged."""
        loss_type = self.hparams.loss_type
        if loss_type == "bnpo":
            return torch.tensor(1.0 / self.hparams.gradient_accumulation_steps, device=mask.device)
        if loss_type == "dapo":
            tokens = self.per_rank_share(mask[minibatch].sum()).clamp_min(1 / self.num_ranks)
            return mask[micro].sum() / tokens
        sequences = self.per_rank_share(torch.tensor(float(len(minibatch)), device=mask.device))
        return len(micro) / sequences

    # ---- 5. step ------------------------------------------------------------------------------------------------

    def grpo_update(self, rollout: GRPORollout) -> dict:
        mask = rollout.response_mask.float()

        def micro_step(minibatch: Tensor, micro: Tensor) -> dict[str, Tensor]:
            loss, stats = self.grpo_loss(rollout, micro)
            self.manual_backward(loss * self.micro_batch_share(mask, minibatch, micro))
            return stats

        history = self.minibatch_updates(
            mask.shape[0], self.hparams.num_iterations, micro_step, self.hparams.max_grad_norm
        )
        tokens = history.pop("tokens")
        stats: dict = {"loss": history.pop("loss")}
        stats.update({name: (values, tokens) for name, values in history.items()})  # token-weighted means
        return stats

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rollout, stats = self.rollout(batch)
        started = time.perf_counter()
        stats.update(self.grpo_update(rollout))
        stats["time/update"] = torch.tensor([time.perf_counter() - started])
        self.log_values("train", stats, batch_size=rollout.sequences.shape[0])

    # ---- evaluation: reward and drift ---------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, "test")

    @torch.no_grad()
    def evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        """Reward and drift of one fresh completion per prompt (``RolloutMechanics.sample_drift``) and, once per
        epoch, ``drift/perplexity`` of the policy on held-out human text."""
        sample = self.sample_completions(batch, self.sampling)
        per_function = self.score(sample)
        task_scores = {}
        for func in self.reward_modules:
            if hasattr(func, "task_scores"):
                task_scores.update(func.task_scores(sample.prompts, sample.completions, sample.batch))
        values = {
            **task_scores,
            "reward": self.summed_rewards(per_function),  # the reward alone, as PPO's evaluation
            **self.per_function_means(per_function),
            **self.sample_drift(sample, self.sampling.temperature),
        }
        self.log_values(stage, values, batch_size=len(sample.completions))
        if batch_idx == 0:
            self.log_heldout_perplexity(stage, self.hparams.drift_texts)
            self.log_completions(stage, sample.prompts, sample.completions, reward=values["reward"])
