"""Distribution matching: fine-tune π toward a target EBM p = P/Z by minimising the forward KL(p‖π) with the
distributional policy gradient (Khalifa et al. 2021, GDC; Korbak et al. 2022, GDC++).

One ``training_step`` is one batch, in order:
1. sample x from the proposal q (a frozen copy; q = a, the original model, at the start);
2. score: log a(x) under the frozen reference a, the target's features φ(x) and log P(x) = log a(x) + log score;
   log q(x) under q; the running Ẑ = mean over all samples so far of P(x)/q(x) (summed across ranks);
3. loss = mean −A(x)·log π(x) with A = P/q (KL-DPG) or A = P/q − Ẑ·π/q (GDC++, ``baseline=True``);
4. every ``proposal_update_every`` steps, on the samples of those steps re-scored under the current π:
   if KL(p‖π) < KL(p‖q), then q ← π (KL-adaptive DPG, the GDC code's "kld" criterion).

KL-control RLHF is the special case ``KLControlTarget(reward, β)``: its optimum is p_z ∝ a·exp(r/β), which DPG
approaches through the forward KL and PPO with a KL penalty through the reverse KL (Korbak et al. 2022, Thm 1).

Validation samples from π and logs constraint satisfaction E_π[φ] per feature (``constraints/<name>``),
KL(π‖a) (``drift/kl_to_init``), KL(p‖π) and TVD(p, π) (importance-sampled with π as the proposal and the running
Ẑ), Distinct-1/2/3 and Self-BLEU-3/4/5 of the batch, and Ẑ.

Across ranks (DDP, FSDP2): Ẑ sums P/q and the sample count over every rank, so it is the global running mean;
the loss is each rank's batch mean (DDP/FSDP average equal-size batches, which is the global mean); the
proposal check averages the ranks' importance-sampled KL estimates (equal sample counts: the global estimate) so
every rank takes the same q ← π decision; λ of a distributional target is fitted on the samples of all ranks;
``dpg/advantage_std`` is the global std. ``dpg/grad_variance`` is per rank (a diagnostic). Diversity metrics
are means of per-rank batch scores.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from datamodules.keys import PROMPT_ATTENTION_MASK, PROMPT_INPUT_IDS
from lit_align.base import AlignmentModule
from lit_align.ebm import DistributionalConstraint, TargetEBM, importance_kl, importance_tvd
from lit_align.generation import SamplingSettings, decode_responses
from lit_align.logprobs import response_logprobs
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
        clip_weights: cap on the importance weights P/q (None: no clipping, as in the papers).
        sampling: :class:`~lit_align.generation.SamplingSettings` or a dict of its fields (default 40 new tokens).
            The papers sample pure ancestrally (temperature 1, no top-k/top-p); anything else makes q(x) differ
            from the distribution samples come from.
        moment_matching_samples: samples from a for fitting λ of a distributional target (GDC code: 10240).
        grad_variance_every: every N steps, log the variance of per-sample gradients, mean‖g_i‖² − ‖ḡ‖²
            (expensive: one backward per sample; 0 = off).
        **kwargs: see :class:`~lit_align.base.AlignmentModule`.
    """

    data_mode: ClassVar[str] = "prompt"
    metric_names = (
        "loss",
        "dpg/z",
        "dpg/weights_mean",
        "dpg/advantage_mean",
        "dpg/advantage_std",
        "dpg/kl_p_pi",
        "dpg/kl_p_q",
        "dpg/tvd_p_pi",
        "dpg/grad_variance",
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
        sampling: SamplingSettings = SamplingSettings(max_new_tokens=40),
        moment_matching_samples: int = 1024,
        grad_variance_every: int = 0,
        **kwargs,
    ) -> None:
        if proposal_update_every < 1:
            raise ValueError(f"proposal_update_every must be >= 1, got {proposal_update_every}")
        sampling = SamplingSettings.of(sampling)  # a dict from Python too; checked before any model loads
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["target"])
        self.sampling = sampling
        self.target = target
        feature_metrics = tuple(f"constraints/{name}" for name in target.feature_names)
        self.metrics = StageMetrics(self.metric_names + feature_metrics, self.extra_metrics())
        self.proposal: nn.Module | None = None
        self.register_buffer("z_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("z_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("proposal_updates", torch.zeros((), dtype=torch.long))
        self.window: list[dict[str, Tensor]] = []

    # ---- models -------------------------------------------------------------------------------------------------

    def build_extra_modules(self) -> None:
        """The proposal q: a frozen copy of the initial policy (= a), later overwritten by π's weights."""
        if self.proposal is None:
            self.proposal = copy.deepcopy(self.policy).eval().requires_grad_(False)

    def extra_frozen_modules(self) -> list[nn.Module]:
        proposal = getattr(self, "proposal", None)
        return [proposal] if proposal is not None else []

    @property
    def z(self) -> Tensor:
        return self.z_sum / self.z_count.clamp_min(1)

    def sequence_logprobs_of(self, model: nn.Module, sequences: Tensor, attention_mask: Tensor, width: int,
                             response_mask: Tensor) -> Tensor:  # fmt: skip
        """log model(x) of each sampled completion: the sum over its tokens up to and including EOS."""
        logprobs, _, _ = response_logprobs(model, sequences, attention_mask, width, self.sampling.temperature)
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
            weights = torch.exp(log_target - log_q)
            total, count = self.sum_and_count_across_ranks(weights)  # Ẑ: a mean over every rank's samples
            self.z_sum += total
            self.z_count += count
        log_pi = self.sequence_logprobs_of(self.policy, sequences, attention_mask, width, response_mask)
        losses, advantage = dpg_loss(
            log_pi, log_target, log_q, self.z, self.hparams.baseline, self.hparams.clip_weights
        )
        loss = losses.mean()
        self.window.append(
            {"sequences": sequences, "attention_mask": attention_mask, "response_mask": response_mask,
             "width": torch.tensor(width), "log_target": log_target, "log_q": log_q}
        )  # fmt: skip
        z = self.z
        stats = {
            "loss": losses.detach(),
            "dpg/z": z.float().reshape(1),
            "dpg/weights_mean": weights.float(),
            "dpg/advantage_mean": advantage.detach().float(),
            "dpg/advantage_std": self.global_std(advantage.detach()).float().reshape(1),
            "dpg/proposal_kl_to_init": (log_q - log_a).float(),
            "completions/mean_length": response_mask.sum(-1).float(),
            **{f"constraints/{name}": values[:, i].float() for i, name in enumerate(self.target.feature_names)},
        }
        if z > 0:  # before any sample has P(x) > 0 the divergences to p are undefined
            stats["dpg/kl_p_pi"] = importance_kl(log_target, log_q, log_pi.detach(), z).float().reshape(1)
            stats["dpg/kl_p_q"] = importance_kl(log_target, log_q, log_q, z).float().reshape(1)
            stats["dpg/tvd_p_pi"] = importance_tvd(log_target, log_q, log_pi.detach(), z).float().reshape(1)
        every = self.hparams.grad_variance_every
        if every and self.global_step % every == 0:
            stats["dpg/grad_variance"] = self.gradient_variance(
                sequences, attention_mask, width, response_mask, log_target, log_q
            ).reshape(1)
        self.log_values("train", stats, batch_size=len(completions))
        return loss

    def global_std(self, values: Tensor) -> Tensor:
        """Population standard deviation of ``values`` over every rank's batch (a collective)."""
        everything = torch.ones_like(values)
        return masked_mean_var(values, everything, unbiased=False, sum_across_ranks=self.sum_across_ranks)[1].sqrt()

    def gradient_variance(self, sequences, attention_mask, width, response_mask, log_target, log_q) -> Tensor:
        """mean_i ‖g_i‖² − ‖mean_i g_i‖² of per-sample loss gradients (the GDC code's GradientMonitor)."""
        parameters = self.trainable_parameters()
        squared_norms, total = [], None
        for i in range(sequences.shape[0]):
            rows = slice(i, i + 1)
            log_pi = self.sequence_logprobs_of(
                self.policy, sequences[rows], attention_mask[rows], width, response_mask[rows]
            )
            loss, _ = dpg_loss(log_pi, log_target[rows], log_q[rows], self.z, self.hparams.baseline,
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
        if self.global_step % self.hparams.proposal_update_every == 0:
            self.maybe_update_proposal()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.log("dpg/proposal_updates", self.proposal_updates.float(), on_step=True, on_epoch=False)

    @torch.no_grad()
    def maybe_update_proposal(self) -> bool:
        """On the samples since the last check, re-scored under the current π: q ← π if KL(p‖π) < KL(p‖q)."""
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
        kl_pi, kl_q = importance_kl(log_target, log_q, log_pi, self.z), importance_kl(log_target, log_q, log_q, self.z)
        kl_pi = self.trainer.strategy.reduce(kl_pi, reduce_op="mean")
        kl_q = self.trainer.strategy.reduce(kl_q, reduce_op="mean")
        if not self.should_update_proposal(kl_pi, kl_q):
            return False
        self.update_proposal()
        rank_zero_info(
            f"DistributionMatching: q ← π at step {self.global_step} "
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
        self.evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    @torch.no_grad()
    def evaluate(self, batch: dict, stage: str) -> None:
        sequences, attention_mask, response_mask, width, completions = self.sample(self.policy, batch)
        values = self.target.feature_values(completions).to(self.device)
        log_pi = self.sequence_logprobs_of(self.policy, sequences, attention_mask, width, response_mask).double()
        log_a = self.reference_sequence_logprobs(sequences, attention_mask, width, response_mask).double()
        log_target = log_a + self.target.log_score(values).to(self.device)
        z = self.z if self.z_count > 0 else torch.exp(log_target - log_pi).mean()
        stats = {
            "drift/kl_to_init": (log_pi - log_a).float(),
            "dpg/z": z.float().reshape(1),
            "completions/mean_length": response_mask.sum(-1).float(),
            **{f"constraints/{name}": values[:, i].float() for i, name in enumerate(self.target.feature_names)},
            **{f"diversity/{name}": torch.tensor([value]) for name, value in diversity_scores(completions).items()},
        }
        if z > 0:
            stats["dpg/kl_p_pi"] = importance_kl(log_target, log_pi, log_pi, z).float().reshape(1)
            stats["dpg/tvd_p_pi"] = importance_tvd(log_target, log_pi, log_pi, z).float().reshape(1)
        self.log_values(stage, stats, batch_size=len(completions))

    # ---- state that must survive a checkpoint --------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dpg_window"] = [{k: v.cpu() for k, v in w.items()} for w in self.window]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.window = [{k: v.to(self.device) for k, v in w.items()} for w in checkpoint.get("dpg_window", [])]
