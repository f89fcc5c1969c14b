"""What the modules that train on their own samples (PPO/RLOO, GRPO) share, once: a rollout sampled and decoded
from the policy, the drift of fresh samples and held-out perplexity (their evaluation), and minibatch updates under
manual optimization that Lightning, the LR schedule and every callback count as ordinary optimizer steps.

``RolloutMechanics`` is a mixin listed before ``AlignmentModule`` (``class PPOModule(RolloutMechanics,
AlignmentModule)``): the algorithm files stay one level below ``AlignmentModule`` and ``base.py`` stays the module
every algorithm shares. A module using it defines ``rollout_split``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from datamodules.collation import pad_rows
from lit_align.generation import Completions
from lit_align.logprobs import token_logprobs
from lit_align.metrics import diversity_scores


@torch.no_grad()
def text_token_logprobs(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 8
) -> Iterator[tuple[Tensor, Tensor]]:
    """Token log-probs of (held-out, human) texts under ``model``, ``batch_size`` texts at a time (tokenized without
    special tokens, truncated to ``max_length``, right-padded): ``(log p(t_i | t_<i) [B, T−1], mask [B, T−1])`` per
    batch. Held-out perplexity during validation and in ``lit-align evaluate``."""
    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        ids, attention = (t.to(device) for t in pad_rows(rows, tokenizer.eos_token_id))
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        yield token_logprobs(logits[:, :-1], ids[:, 1:]), attention[:, 1:]


class RolloutMechanics:
    """Sampling, evaluation and minibatch updates of on-policy modules (a mixin for ``AlignmentModule``
    subclasses: it uses their policy, reference, tokenizer, metrics and trainer)."""

    # ---- the rollout -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        batch_size = getattr(datamodule, "batch_size", None)
        if stage == "fit" and isinstance(batch_size, int):
            self.check_rollout_split(batch_size, "the DataModule's batch_size")  # before any model loads

    # ---- evaluation: the alignment tax of fresh samples ------------------------------------------------------

    @torch.no_grad()
    def sample_drift(self, sample: Completions, temperature: float = 1.0) -> dict[str, Tensor]:
        """What evaluation logs about fresh samples besides their reward: ``drift/kl_to_init`` (Σ_t log π − log π_ref
        over the sampled tokens, a k1 estimate of KL(π‖π_ref); only when a reference exists), the completions'
        mean length and their diversity (``diversity/*``)."""
        mask = sample.response_mask.float()
        values = {"completions/mean_length": mask.sum(-1)}
        if self.reference is not None or self.uses_lora:
            args = (sample.sequences, sample.attention_mask, sample.prompt_width, temperature)
            logprobs = self.response_logprobs_of(self.policy, *args).logps
            with self.reference_forward() as reference:
                ref_logprobs = self.response_logprobs_of(reference, *args).logps
            values["drift/kl_to_init"] = ((logprobs - ref_logprobs) * mask).sum(-1)
        values.update(
            {f"diversity/{name}": torch.tensor([v]) for name, v in diversity_scores(sample.completions).items()}
        )
        return values

    @torch.no_grad()
    def log_heldout_perplexity(self, stage: str, texts: int) -> None:
        """``drift/perplexity`` of the policy on ``texts`` held-out human texts of the DataModule (its
        ``heldout_texts``), split across ranks (the metric's sums sync); nothing when ``texts`` is 0 or the DataModule
        has none. The module's ``extra_metrics`` must include ``drift/perplexity``."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if texts <= 0 or not hasattr(datamodule, "heldout_texts"):
            return
        chosen = datamodule.heldout_texts(texts)
        chosen = chosen[self.trainer.global_rank :: self.trainer.world_size]  # each rank its share; sums sync
        if not chosen:
            rank_zero_warn("drift/perplexity: no held-out texts on this rank")
            return
        metric = self.metrics.get(stage, "drift/perplexity")
        for logps, mask in text_token_logprobs(self.policy, self.tokenizer, chosen, max_length=128):
            metric.update(logps, mask)
        self.log(self.metrics.log_name(stage, "drift/perplexity"), metric, on_step=False, on_epoch=True)

    # ---- minibatch steps under manual optimization ------------------------------------------------------------

    def rollout_split(self) -> dict[str, int]:
        """``{argument name: value}`` of the samples per prompt, the minibatches per rollout (one optimizer step
        each) and the micro-batches per minibatch, in that order (e.g. PPO's ``samples_per_prompt``,
        ``num_mini_batches``, ``gradient_accumulation_steps``)."""
        raise NotImplementedError

    def check_rollout_split(self, prompts: int, source: str) -> None:
        """Refuse a rollout of ``prompts`` × samples-per-prompt rows that does not split into equal minibatches of
        equal micro-batches (``rollout_split``): an uneven split would add optimizer steps or weigh rows unequally,
        so ``max_steps``, the LR schedule and callbacks would not count what the config says (TRL refuses too)."""
        (k_name, k), (splits_name, splits), (micro_name, micro) = self.rollout_split().items()
        rows, owner = prompts * k, type(self).__name__
        if rows % splits:
            raise ValueError(
                f"{owner}: a rollout of {rows} rows ({source}: {prompts} prompts × {k_name}={k}) does not split into "
                f"{splits_name}={splits} equal minibatches; choose a batch size that makes the rollout a multiple of "
                f"{splits}, or a {splits_name} that divides {rows}"
            )
        if (rows // splits) % micro:
            raise ValueError(
                f"{owner}: a minibatch of {rows // splits} rows (rollout of {rows} rows from {source}: {prompts} "
                f"prompts × {k_name}={k}, / {splits_name}={splits}) does not split into {micro_name}={micro} equal "
                "micro-batches"
            )

    def on_train_start(self) -> None:
        """Rollout modules: the training loader itself (any loader, not only our DataModules) must give rollouts that
        split evenly — its batch size and, when it keeps a partial last batch that training reaches, that batch."""
        loader = self.trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None)
        if not isinstance(batch_size, int):
            return  # a custom batch sampler: minibatch_updates checks each rollout
        self.check_rollout_split(batch_size, "the training loader's batch_size")
        try:
            samples = len(loader.sampler)
        except TypeError:
            return
        full, last = divmod(samples, batch_size)
        if last and not loader.drop_last and self.trainer.num_training_batches > full:
            self.check_rollout_split(
                last, f"the last batch of each epoch, {samples} prompts per rank in batches of {batch_size}"
            )

    def minibatch_updates(
        self,
        rows: int,
        epochs: int,
        micro_step: Callable[[Tensor, Tensor], dict[str, Tensor]],
        max_grad_norm: float | None,
    ) -> dict[str, Tensor]:
        """``epochs`` passes over a rollout of ``rows`` rows, each in a fresh random order cut into equal minibatches
        (one optimizer step each) of equal micro-batches, as ``rollout_split`` says (checked here too).

        ``micro_step(minibatch, micro)`` — row indices of the minibatch and of one of its micro-batches — computes
        that micro-batch's share of the minibatch loss, backpropagates it (``manual_backward``) and returns detached
        statistics; they come back stacked over every micro-batch of the update.
        """
        k, minibatches, micro_batches = self.rollout_split().values()
        self.check_rollout_split(rows // k, "this batch")
        history: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(epochs):
            order = torch.randperm(rows, device=self.device)
            for minibatch in order.split(rows // minibatches):
                for micro in minibatch.split(rows // minibatches // micro_batches):
                    for name, value in micro_step(minibatch, micro).items():
                        history[name].append(value)
                self.manual_optimizer_step(max_grad_norm)
        return {name: torch.stack(values) for name, values in history.items()}

    def manual_optimizer_step(self, max_grad_norm: float | None = None) -> None:
        """One optimizer step under manual optimization, as Lightning's automatic loop makes it: clip the gradients
        (None: no clipping), step through Lightning's optimizer wrapper (``on_before_optimizer_step`` fires and
        ``global_step`` counts it), then ``on_after_optimizer_step`` for our callbacks, zero the gradients and step
        the LR schedule."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.log_optimizer_state()
        if max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=max_grad_norm)
        optimizer.step()
        self.call_callbacks("on_after_optimizer_step")
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
