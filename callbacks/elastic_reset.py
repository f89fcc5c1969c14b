"""Elastic Reset (Noukhovitch, Lavoie, Strub, Courville — NeurIPS 2023, arXiv 2312.07551).

Keep an exponential moving average of the policy; every ``reset_every`` iterations set the policy to the EMA and
the EMA back to the initial model (Algorithm 1). The KL penalty of the training loss stays on.

    θ_ema ← d·θ_ema + (1 − d)·θ          every ``ema_every`` iterations (d = ``decay``, paper 0.995)
    θ ← θ_ema;  θ_ema ← θ_0             every ``reset_every`` iterations (after the EMA update)

An iteration is one training batch by default (``every="batch"``): for PPO one rollout batch with all its
``ppo_epochs × num_mini_batches`` optimizer steps, as the paper counts PPO iterations and its IMDB code
(RL4LMs ``EMAPPO``) updates the EMA once per iteration, after the PPO epochs; for DPO/KTO one batch = one optimizer
step (with gradient accumulation, the batch that steps). Counting optimizer steps instead (``every="optimizer_step"``)
makes PPO decay and reset ``ppo_epochs × num_mini_batches`` times faster for the same numbers; it is kept as an
option, e.g. for the StackLLaMA code, which updates the EMA once per PPO epoch (``every="optimizer_step"``,
``ema_every=num_mini_batches``, ``reset_every`` = 260 × ``ppo_epochs × num_mini_batches``). Resets fall after
iterations n, 2n, … (StackLLaMA's code; RL4LMs' 0-indexed loop also resets after the first one).

Extra copies of the weights: the EMA, the size of the trainable weights (only the adapters under LoRA). θ_0 is
read from the frozen reference while that still holds the initial model; otherwise (LoRA, value head, a reference
from elsewhere, or a callback that rewrites the reference) it is a second copy. With ``ema_as_reference`` the EMA
*is* the reference, so it costs no copy, and θ_0 is kept.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.base import AlignmentCallback
from callbacks.weights import (
    attach_store,
    ema_update_,
    initial_weights,
    local,
    reference_pairs,
)


class ElasticReset(AlignmentCallback):
    """Periodically reset the policy to its EMA, and the EMA to the initial model.

    Args:
        reset_every: iterations between resets (paper: every 17 PPO iterations on IMDB, 260 on StackLLaMA).
        decay: EMA decay d (paper: 0.995).
        ema_every: iterations between EMA updates (1: the IMDB code's once per PPO iteration).
        every: what one iteration is: ``"batch"`` (default), a training batch that made at least one optimizer
            step (a PPO rollout with all its epochs and minibatches), or ``"optimizer_step"``.
        include_value_head: also average and reset PPO's value head / value model. Default no: both public
            implementations exclude it (StackLLaMA's code comments "exclude the value head params").
        reset_optimizer: clear the optimizer state (Adam moments) at each reset. Default no, as in both public
            implementations (RL4LMs' ``reset_opt`` ablation is False in the paper configs).
        ema_as_reference: the EMA serves as the KL reference (RL4LMs' IMDB setup: ``ema_model = _ref_model``, so the
            reference is reset to θ_0 with the EMA). Default no: the reference stays the initial model
            (StackLLaMA setup). Needs a full reference copy (not LoRA, not precomputed log-probs).
    """

    def __init__(
        self,
        reset_every: int,
        decay: float = 0.995,
        ema_every: int = 1,
        every: Literal["batch", "optimizer_step"] = "batch",
        include_value_head: bool = False,
        reset_optimizer: bool = False,
        ema_as_reference: bool = False,
    ) -> None:
        if every not in ("batch", "optimizer_step"):
            raise ValueError(f"ElasticReset: every must be 'batch' or 'optimizer_step', got {every!r}")
        if reset_every < 1 or ema_every < 1:
            raise ValueError(f"ElasticReset: reset_every ({reset_every}) and ema_every ({ema_every}) must be >= 1")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ElasticReset: decay must be in [0, 1], got {decay}")
        if ema_as_reference and include_value_head:
            raise ValueError("ElasticReset: ema_as_reference covers the policy only; it cannot include the value head")
        self.reset_every, self.decay, self.ema_every, self.every = reset_every, decay, ema_every, every
        self.include_value_head, self.reset_optimizer = include_value_head, reset_optimizer
        self.ema_as_reference = ema_as_reference
        self.steps = 0  # optimizer steps
        self.batches = 0  # training batches that made at least one optimizer step
        self.pending = 0  # optimizer steps of the current batch (every="batch" counts it at the batch's end)
        self.ema_updates = 0
        self.resets = 0

    @property
    def writes_reference(self) -> bool:
        return self.ema_as_reference

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            reset_every=self.reset_every, decay=self.decay, ema_every=self.ema_every, every=self.every,
            ema_as_reference=self.ema_as_reference,
        )  # fmt: skip

    def on_configure_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights = pl_module.trainable_named_parameters(include_extra=self.include_value_head)
        self.initial = initial_weights(trainer, pl_module, "elastic_reset_initial", self.weights)
        if self.ema_as_reference:
            pairs = {id(policy): reference for _, policy, reference in reference_pairs(pl_module, "ElasticReset")}
            self.ema = {name: pairs[id(p)] for name, p in self.weights.items()}
        else:
            self.ema = dict(attach_store(pl_module, "elastic_reset_ema", self.weights).items())

    def on_after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps += 1
        if self.every == "optimizer_step":
            self.iteration(trainer, self.steps)
        else:
            self.pending += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        # before ModelCheckpoint's own on_train_batch_end (Lightning runs checkpoint callbacks last), so a checkpoint
        # taken at this batch holds the EMA, the reset and the counters of this batch
        if self.every == "batch" and self.pending:
            self.pending = 0
            self.batches += 1
            self.iteration(trainer, self.batches)
        pl_module.log("elastic_reset/resets", float(self.resets), on_step=True, on_epoch=False)

    @torch.no_grad()
    def iteration(self, trainer: L.Trainer, count: int) -> None:
        """End of iteration ``count``: the EMA update, then the reset when it is due."""
        if count % self.ema_every == 0:
            for name, parameter in self.weights.items():
                ema_update_(local(self.ema[name]), local(parameter), self.decay)
            self.ema_updates += 1
        if count % self.reset_every == 0:
            for name, parameter in self.weights.items():
                local(parameter).copy_(local(self.ema[name]))
                local(self.ema[name]).copy_(self.initial[name])
            if self.reset_optimizer:
                for optimizer in trainer.optimizers:
                    optimizer.state.clear()
            self.resets += 1
            unit = "training batch" if self.every == "batch" else "optimizer step"
            rank_zero_info(f"ElasticReset: reset {self.resets} after {unit} {count} (optimizer step {self.steps})")

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "batches": self.batches,
            "pending": self.pending,
            "ema_updates": self.ema_updates,
            "resets": self.resets,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps, self.resets = state_dict["steps"], state_dict["resets"]
        self.batches, self.pending = state_dict["batches"], state_dict["pending"]
        self.ema_updates = state_dict["ema_updates"]
