"""Distribution matching: fine-tune π toward a target EBM p = P/Z by minimising the forward KL(p‖π) with the
distributional policy gradient (Khalifa et al. 2021, GDC; Korbak et al. 2022, GDC++).

One ``training_step`` is one batch, in order:
1. sample x from the proposal q (a frozen copy; q = a, the original model, at the start);
2. score: log a(x) under the frozen reference a, the target's features φ(x) and log P(x) = log a(x) + log score;
   log q(x) under q; the running Ẑ = mean over all samples so far of P(x)/q(x) (summed across ranks), kept as
   log Ẑ (log-sum-exp) so that it never overflows;
3. loss = mean −A(x)·log π(x) with A = P/(Ẑq) (KL-DPG) or A = P/(Ẑq) − π/q (GDC++, ``baseline=True``): the GDC
   code's P/q and P/q − Ẑ·π/q divided by Ẑ, formed in log space (``losses.dpg_loss``: same direction, finite
   for any log P − log q; the step-size argument is in its docstring);
4. every ``proposal_update_every`` steps, on the samples of those steps re-scored under the current π: if the
   importance weights P/q of those samples have an effective sample size ≥ ``min_proposal_ess`` and
   KL(p‖π) < KL(p‖q), then q ← π (KL-adaptive DPG, the GDC code's "kld" criterion); below it the check is skipped
   and counted.

KL-control RLHF is the special case ``KLControlTarget(reward, β)``: its optimum is p_z ∝ a·exp(r/β), which DPG
approaches through the forward KL and PPO with a KL penalty through the reverse KL (Korbak et al. 2022, Thm 1).

Validation samples from π and logs constraint satisfaction E_π[φ] per feature (``constraints/<name>``),
KL(π‖a) (``drift/kl_to_init``), KL(p‖π) and TVD(p, π) (importance-sampled with π as the proposal and the running
Ẑ), Distinct-1/2/3 and Self-BLEU-3/4/5 of the batch, and log Ẑ (``dpg/log_z``).

Across ranks (DDP, FSDP2): Ẑ log-sum-exps P/q and sums the sample count over every rank, so it is the global
running mean; the proposal check's effective sample size is over every rank's window;
the loss is each rank's batch mean (DDP/FSDP average equal-size batches, which is the global mean); the
proposal check averages the ranks' importance-sampled KL estimates (equal sample counts: the global estimate) so
every rank takes the same q ← π decision; λ of a distributional target is fitted on the samples of all ranks;
``dpg/advantage_std`` is the global std. ``dpg/grad_variance`` is rank 0's (a diagnostic, written only at the steps
it is measured). Diversity metrics are means of per-rank batch scores.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from datamodules.keys import PROMPT, PROMPT_ATTENTION_MASK, PROMPT_INPUT_IDS
from lit_align.base import AlignmentModule
from lit_align.ebm import DistributionalConstraint, TargetEBM, importance_kl, importance_tvd
from lit_align.generation import SamplingSettings, decode_responses
from lit_align.losses import dpg_loss, masked_mean_var
from lit_align.metrics import DIVERSITY_NAMES, StageMetrics, diversity_scores
from lit_align.strategies import reshard


class DistributionMatchingModule(AlignmentModule):
    """KL-DPG / GDC++ toward a target EBM over completions of the DataModule's prompts (empty prompt = BOS).

    Args:
        target: the EBM (``lit_align.ebm``): pointwise, distributional (λ fitted before training), hybrid or
            KL-control.
        baseline: GDC++'s baseline Ẑ·π/q (True) or plain KL-DPG (False).
        proposal_update_every: optimizer steps between proposal checks (GDC code: 10).
        clip_weights: cap on the normalised importance weights P/(Ẑq), whose mean under q is ≈ 1 (None: no
            clipping, as in the papers).
        sampling: :class:`~lit_align.generation.SamplingSettings` or a dict of its fields (default 40 new tokens).
            The papers sample pure ancestrally (temperature 1, no top-k/top-p); anything else makes q(x) differ
            from the distribution samples come from.
        min_proposal_ess: the smallest effective sample size (Σw)²/Σw² of the window's importance weights
            w = P/q at which the proposal check compares KL(p‖π) with KL(p‖q); below it the check is skipped,
            counted (``dpg/proposal_checks_skipped``) and q kept. The ESS is logged at every check (``dpg/ess``).
            Default 10: ESS ≤ 1/max(w/Σw)², so at ESS ≥ 10 no sample carries more than 1/√10 ≈ 32 % of the weight
            and the estimates' standard error is at most ≈ 0.32× the spread of the per-sample terms; below that
            the estimates are dominated by one or two samples (with one positive sample the KL estimates came out
            at −80 nats, an impossible value, and q ← π was accepted on them). At q = a and a pointwise target
            the weights are 0/1, so the ESS is the number of samples satisfying the constraint in the window: the
            papers' 10 × 512 samples per check pass it for constraints q satisfies at ≥ 0.2 %. ``0`` restores the
            papers' unguarded check.
        moment_matching_samples: samples from a for fitting λ of a distributional target (GDC code: 10240).
        grad_variance_every: every N steps, log the variance of per-sample gradients, mean‖g_i‖² − ‖ḡ‖²
            (expensive: one backward per sample; 0 = off).
        **kwargs: see :class:`~lit_align.base.AlignmentModule`.
    """

    paper: ClassVar[str] = (
        "Khalifa et al. 2021, *A Distributional Approach to Controlled Text Generation* (KL-DPG); Korbak et "
        "al. 2022 (GDC++)."
    )

    data_mode: ClassVar[str] = "prompt"
    object_arguments = ("target",)
    metric_names = (
        "loss",
        "dpg/log_z",
        "dpg/weights_mean",
        "dpg/advantage_mean",
        "dpg/advantage_std",
        "dpg/kl_p_pi",
        "dpg/kl_p_q",
        "dpg/tvd_p_pi",
        "dpg/proposal_kl_to_init",
        "drift/kl_to_init",
        "completions/mean_length",
        *(f"diversity/{name}" for name in DIVERSITY_NAMES),
    )
    progress_bar_metrics = ("dpg/kl_p_pi",)

    def __init__(
        self,
        target: TargetEBM,
        baseline: bool = True,
        proposal_update_every: int = 10,
        clip_weights: float | None = None,
        min_proposal_ess: float = 10.0,
        sampling: SamplingSettings = SamplingSettings(max_new_tokens=40),
        moment_matching_samples: int = 1024,
        grad_variance_every: int = 0,
        **kwargs,
    ) -> None:
        if proposal_update_every < 1:
            raise ValueError(f"proposal_update_every must be >= 1, got {proposal_update_every}")
        if not min_proposal_ess >= 0:
            raise ValueError(f"min_proposal_ess must be >= 0, got {min_proposal_ess}")
        if clip_weights is not None and not clip_weights > 0:
            raise ValueError(f"clip_weights must be > 0 (or None: no clipping), got {clip_weights}")
        if moment_matching_samples < 1:
            raise ValueError(f"moment_matching_samples must be >= 1, got {moment_matching_samples}")
        if grad_variance_every < 0:
            raise ValueError(f"grad_variance_every must be >= 0 (0 = never), got {grad_variance_every}")
        sampling = SamplingSettings.of(sampling)  # a dict from Python too; checked before any model loads
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=list(self.object_arguments))
        self.sampling = sampling
        self.target = target
        feature_metrics = tuple(f"constraints/{name}" for name in target.feature_names)
        self.metrics = StageMetrics(self.metric_names + feature_metrics, self.extra_metrics())
        self.proposal: nn.Module | None = None
        # Ẑ = exp(log_z_sum)/z_count: log Σ P/q over every sample so far (log space: P/q can exceed float64)
        self.register_buffer("log_z_sum", torch.full((), float("-inf"), dtype=torch.float64))
        self.register_buffer("z_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("proposal_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("proposal_checks_skipped", torch.zeros((), dtype=torch.long))
        self.window: list[dict[str, Tensor]] = []
        self.last_check_ess: float | None = None  # the ESS of this step's proposal check, logged at batch end

    # ---- models -------------------------------------------------------------------------------------------------

    def build_extra_modules(self) -> None:
        """The proposal q: a frozen copy of the initial policy (= a), later overwritten by π's weights."""
        if self.proposal is None:
            self.proposal = copy.deepcopy(self.policy).eval().requires_grad_(False)

    def extra_frozen_modules(self) -> list[nn.Module]:
        proposal = getattr(self, "proposal", None)
        return [proposal] if proposal is not None else []

    @property
    def log_z(self) -> Tensor:
        """log Ẑ, the running mean of P/q over every sample drawn so far (−inf before any sample has P > 0)."""
        return self.log_z_sum - torch.log(self.z_count.clamp_min(1))

    def logsumexp_and_count_across_ranks(self, *log_values: Tensor) -> tuple[list[Tensor], Tensor]:
        """log Σ exp(v) of each of ``log_values`` over every rank's elements, and the element count of the first
        (one all-gather of one number per tensor per rank; log-sum-exp is associative, so no value leaves log
        space)."""
        local = torch.stack(
            [*(torch.logsumexp(v.double().flatten(), 0) for v in log_values),
             torch.tensor(float(log_values[0].numel()), dtype=torch.float64, device=log_values[0].device)]
        )  # fmt: skip
        if self.num_ranks > 1:
            gathered = self.all_gather(local).reshape(-1, local.numel())
            local = torch.cat([torch.logsumexp(gathered[:, :-1], 0), gathered[:, -1:].sum(0)])
        return list(local[:-1].unbind()), local[-1]

    def sequence_logprobs_of(self, model: nn.Module, sequences: Tensor, attention_mask: Tensor, width: int,
                             response_mask: Tensor) -> Tensor:  # fmt: skip
        """log model(x) of each sampled completion: the sum over its tokens up to and including EOS."""
        logprobs = self.response_logprobs_of(model, sequences, attention_mask, width, self.sampling.temperature).logps
        return (logprobs * response_mask.to(logprobs.dtype)).sum(-1)

    def reference_sequence_logprobs(self, sequences, attention_mask, width, response_mask) -> Tensor:
        """log a(x): the sequence log-prob under the reference (the frozen copy, or the adapter-free policy)."""
        with self.reference_forward() as reference:
            return self.sequence_logprobs_of(reference, sequences, attention_mask, width, response_mask)

    def sample(self, model: nn.Module, batch: dict) -> tuple[Tensor, Tensor, Tensor, int, list[str]]:
        prompt_ids, prompt_mask = batch[PROMPT_INPUT_IDS], batch[PROMPT_ATTENTION_MASK]
        sampled = self.generate_responses(model, prompt_ids, prompt_mask, self.sampling)
        sequences, attention_mask, response_mask = sampled
        width = prompt_ids.shape[1]
        _, completions = decode_responses(self.tokenizer, sequences, width, response_mask)
        return sequences, attention_mask, response_mask, width, completions

    # ---- λ of a distributional target ------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.target.needs_fit:
            self.fit_target()

    @torch.no_grad()
    def fit_target(self) -> None:
        """Fit λ on ``moment_matching_samples`` samples from a (the proposal at the start), gathered from all ranks."""
        loader = self.trainer.datamodule.train_dataloader()
        values, total = [], 0
        while total < self.hparams.moment_matching_samples // self.trainer.world_size:
            for batch in loader:
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                *_, completions = self.sample(self.proposal, batch)
                values.append(self.target.feature_values(completions))
                total += len(completions)
                if total >= self.hparams.moment_matching_samples // self.trainer.world_size:
                    break
        local = torch.cat(values).to(self.device)
        gathered = self.all_gather(local).reshape(-1, local.shape[-1]) if self.trainer.world_size > 1 else local
        # samples come from q = a, so the base importance weights a/q are 1
        assert isinstance(self.target, DistributionalConstraint)
        self.target.fit(gathered.cpu(), torch.zeros(gathered.shape[0], dtype=torch.float64))

    # ---- training ---------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        with torch.no_grad():
            sequences, attention_mask, response_mask, width, completions = self.sample(self.proposal, batch)
            values = self.target.feature_values(completions).to(self.device)
            log_a = self.reference_sequence_logprobs(sequences, attention_mask, width, response_mask).double()
            log_target = log_a + self.target.log_score(values).to(self.device)
            log_q = self.sequence_logprobs_of(self.proposal, sequences, attention_mask, width, response_mask).double()
            (log_total,), count = self.logsumexp_and_count_across_ranks(log_target - log_q)  # Σ P/q, every rank
            self.log_z_sum.copy_(torch.logaddexp(self.log_z_sum, log_total))
            self.z_count += count
            log_z = self.log_z  # includes this batch, so every P/(Ẑq) ≤ the number of samples so far
            weights = torch.exp(log_target - log_q - log_z)  # P/(Ẑq), mean ≈ 1 under q
        log_pi = self.sequence_logprobs_of(self.policy, sequences, attention_mask, width, response_mask)
        losses, advantage = dpg_loss(log_pi, log_target, log_q, log_z, self.hparams.baseline, self.hparams.clip_weights)
        loss = losses.mean()
        self.window.append(
            {"sequences": sequences, "attention_mask": attention_mask, "response_mask": response_mask,
             "width": torch.tensor(width), "log_target": log_target, "log_q": log_q}
        )  # fmt: skip
        stats = {
            "loss": losses.detach(),
            "dpg/log_z": log_z.float().reshape(1),
            "dpg/weights_mean": weights.float(),
            "dpg/advantage_mean": advantage.detach().float(),
            "dpg/advantage_std": self.global_std(advantage.detach()).float().reshape(1),
            "dpg/proposal_kl_to_init": (log_q - log_a).float(),
            "completions/mean_length": response_mask.sum(-1).float(),
            **{f"constraints/{name}": values[:, i].float() for i, name in enumerate(self.target.feature_names)},
        }
        if torch.isfinite(log_z):  # before any sample has P(x) > 0 the divergences to p are undefined
            stats["dpg/kl_p_pi"] = importance_kl(log_target, log_q, log_pi.detach(), log_z).float().reshape(1)
            stats["dpg/kl_p_q"] = importance_kl(log_target, log_q, log_q, log_z).float().reshape(1)
            stats["dpg/tvd_p_pi"] = importance_tvd(log_target, log_q, log_pi.detach(), log_z).float().reshape(1)
        self.log_values("train", stats, batch_size=len(completions))
        every = self.hparams.grad_variance_every
        if every and self.global_step % every == 0:
            variance = self.gradient_variance(sequences, attention_mask, width, response_mask, log_target, log_q)
            self.log_this_step_only({"dpg/grad_variance": variance})
        return loss

    def global_std(self, values: Tensor) -> Tensor:
        """Population standard deviation of ``values`` over every rank's batch (a collective)."""
        everything = torch.ones_like(values)
        return masked_mean_var(values, everything, unbiased=False, sum_across_ranks=self.sum_across_ranks)[1].sqrt()

    def gradient_variance(self, sequences, attention_mask, width, response_mask, log_target, log_q) -> Tensor:
        """mean_i ‖g_i‖² − ‖mean_i g_i‖² of per-sample loss gradients (the GDC code's GradientMonitor), of the
        loss normalised by Ẑ: the GDC code's value × 1/Ẑ² (ratios between runs at equal Ẑ are unchanged)."""
        parameters = self.trainable_parameters()
        squared_norms, total = [], None
        for i in range(sequences.shape[0]):
            rows = slice(i, i + 1)
            log_pi = self.sequence_logprobs_of(
                self.policy, sequences[rows], attention_mask[rows], width, response_mask[rows]
            )
            loss, _ = dpg_loss(log_pi, log_target[rows], log_q[rows], self.log_z, self.hparams.baseline,
                               self.hparams.clip_weights)  # fmt: skip
            grads = torch.autograd.grad(loss.sum(), parameters, allow_unused=True)
            flat = torch.cat([g.reshape(-1) for g in grads if g is not None]).double()
            squared_norms.append(flat.pow(2).sum())
            total = flat if total is None else total + flat
        mean = total / sequences.shape[0]
        return (torch.stack(squared_norms).mean() - mean.pow(2).sum()).float()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the step, before Lightning's on_train_batch_end hooks (ModelCheckpoint's among them), so a
        # checkpoint of step N holds q after step N's check. The sample window is not checkpointed: with
        # proposal_update_every > 1 a resumed run's first check sees only the samples drawn since the resume.
        # global_step still counts the steps before this one here, so the checks follow steps N, 2N, 3N, ...
        if self.steps_done % self.hparams.proposal_update_every == 0:
            self.maybe_update_proposal()

    @property
    def steps_done(self) -> int:
        """Optimizer steps completed, this one included, when called from ``optimizer_step`` after the step."""
        return self.global_step + 1

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.log("dpg/proposal_updates", self.proposal_updates.float(), on_step=True, on_epoch=False)
        self.log("dpg/proposal_checks_skipped", self.proposal_checks_skipped.float(), on_step=True, on_epoch=False)
        if self.last_check_ess is not None:
            self.log("dpg/ess", self.last_check_ess, on_step=True, on_epoch=False)
            self.last_check_ess = None

    @torch.no_grad()
    def maybe_update_proposal(self) -> bool:
        """On the samples since the last check, re-scored under the current π: q ← π if KL(p‖π) < KL(p‖q), the
        check made only when the importance weights P/q of those samples (every rank's) have an effective sample
        size ≥ ``min_proposal_ess``; a skipped check is counted in ``proposal_checks_skipped``."""
        if not self.window:
            return False
        log_target = torch.cat([w["log_target"] for w in self.window])
        log_q = torch.cat([w["log_q"] for w in self.window])
        log_pi = torch.cat(
            [
                self.sequence_logprobs_of(
                    self.policy, w["sequences"], w["attention_mask"], int(w["width"]), w["response_mask"]
                ).double()
                for w in self.window
            ]
        )
        self.window = []
        (log_sum, log_sum_sq), _ = self.logsumexp_and_count_across_ranks(log_target - log_q, 2 * (log_target - log_q))
        ess = 0.0 if torch.isneginf(log_sum) else float(torch.exp(2 * log_sum - log_sum_sq))  # (Σw)²/Σw²
        self.last_check_ess = ess
        if ess < self.hparams.min_proposal_ess:
            self.proposal_checks_skipped += 1
            rank_zero_info(
                f"DistributionMatching: proposal check skipped after step {self.steps_done}: the importance weights' "
                f"effective sample size {ess:.2f} < min_proposal_ess {self.hparams.min_proposal_ess}"
            )
            return False
        log_z = self.log_z
        kl_pi, kl_q = importance_kl(log_target, log_q, log_pi, log_z), importance_kl(log_target, log_q, log_q, log_z)
        kl_pi = self.trainer.strategy.reduce(kl_pi, reduce_op="mean")
        kl_q = self.trainer.strategy.reduce(kl_q, reduce_op="mean")
        if not self.should_update_proposal(kl_pi, kl_q):
            return False
        self.update_proposal()
        rank_zero_info(
            f"DistributionMatching: q ← π after step {self.steps_done} "
            f"(KL(p‖π) {float(kl_pi):.4f} < KL(p‖q) {float(kl_q):.4f})"
        )
        return True

    @staticmethod
    def should_update_proposal(kl_p_pi: Tensor, kl_p_q: Tensor) -> bool:
        """Replace q by π only when π is estimated closer to p (GDC's "kld" criterion)."""
        return bool(torch.isfinite(kl_p_pi)) and bool(kl_p_pi < kl_p_q)

    @torch.no_grad()
    def update_proposal(self) -> None:
        reshard(self.policy)
        reshard(self.proposal)
        for proposal, policy in zip(self.proposal.parameters(), self.policy.parameters(), strict=True):
            proposal.copy_(policy)
        self.proposal_updates += 1

    # ---- validation -------------------------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, "test", batch_idx)

    @torch.no_grad()
    def evaluate(self, batch: dict, stage: str, batch_idx: int = 0) -> None:
        sequences, attention_mask, response_mask, width, completions = self.sample(self.policy, batch)
        values = self.target.feature_values(completions).to(self.device)
        log_pi = self.sequence_logprobs_of(self.policy, sequences, attention_mask, width, response_mask).double()
        log_a = self.reference_sequence_logprobs(sequences, attention_mask, width, response_mask).double()
        log_target = log_a + self.target.log_score(values).to(self.device)
        if self.z_count > 0:
            log_z = self.log_z
        else:  # before training: Ẑ from these samples of π
            log_z = torch.logsumexp(log_target - log_pi, 0) - math.log(log_pi.numel())
        stats = {
            "drift/kl_to_init": (log_pi - log_a).float(),
            "dpg/log_z": log_z.float().reshape(1),
            "completions/mean_length": response_mask.sum(-1).float(),
            **{f"constraints/{name}": values[:, i].float() for i, name in enumerate(self.target.feature_names)},
            **{f"diversity/{name}": torch.tensor([value]) for name, value in diversity_scores(completions).items()},
        }
        if torch.isfinite(log_z):
            stats["dpg/kl_p_pi"] = importance_kl(log_target, log_pi, log_pi, log_z).float().reshape(1)
            stats["dpg/tvd_p_pi"] = importance_tvd(log_target, log_pi, log_pi, log_z).float().reshape(1)
        self.log_values(stage, stats, batch_size=len(completions))
        if batch_idx == 0:
            features = {name: values[:, i] for i, name in enumerate(self.target.feature_names)}
            self.log_completions(stage, list(batch[PROMPT]), completions, log_target=log_target, **features)

    # ---- state that must survive a checkpoint --------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpg_window"] = [{k: v.cpu() for k, v in w.items()} for w in self.window]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.window = [{k: v.to(self.device) for k, v in w.items()} for w in checkpoint.get("dpg_window", [])]
