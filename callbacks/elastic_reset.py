"""Elastic Reset (Noukhovitch, Lavoie, Strub, Courville — NeurIPS 2023, arXiv 2312.07551).

Keep an exponential moving average of the policy; every ``reset_every`` optimizer steps set the policy to the EMA
and the EMA back to the initial model (Algorithm 1). The KL penalty of the training loss stays on.

    θ_ema ← d·θ_ema + (1 − d)·θ          every ``ema_every`` steps (d = ``decay``, paper 0.995)
    θ ← θ_ema;  θ_ema ← θ_0             every ``reset_every`` steps

Extra copies of the weights: the EMA, the size of the trainable weights (only the adapters under LoRA). θ_0 is
read from the frozen reference while that still holds the initial model; otherwise (LoRA, value head, a reference
from elsewhere, or a callback that rewrites the reference) it is a second copy. With ``ema_as_reference`` the EMA
*is* the reference, so it costs no copy, and θ_0 is kept.
"""

from __future__ import annotations

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
        reset_every: optimizer steps between resets (paper: every 17 PPO iterations on IMDB, 260 on StackLLaMA).
        decay: EMA decay d (paper: 0.995).
        ema_every: optimizer steps between EMA updates. The IMDB code updates once per PPO iteration, the
            StackLLaMA code once per PPO epoch; set it to ``ppo_epochs × num_mini_batches`` for the former.
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
        include_value_head: bool = False,
        reset_optimizer: bool = False,
        ema_as_reference: bool = False,
    ) -> None:
        if reset_every < 1 or ema_every < 1:
            raise ValueError(f"ElasticReset: reset_every ({reset_every}) and ema_every ({ema_every}) must be >= 1")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ElasticReset: decay must be in [0, 1], got {decay}")
        if ema_as_reference and include_value_head:
            raise ValueError("ElasticReset: ema_as_reference covers the policy only; it cannot include the value head")
        self.reset_every, self.decay, self.ema_every = reset_every, decay, ema_every
        self.include_value_head, self.reset_optimizer = include_value_head, reset_optimizer
        self.ema_as_reference = ema_as_reference
        self.steps = 0
        self.resets = 0

    @property
    def writes_reference(self) -> bool:
        return self.ema_as_reference

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            reset_every=self.reset_every, decay=self.decay, ema_every=self.ema_every,
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

    @torch.no_grad()
    def on_after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps += 1
        if self.steps % self.ema_every == 0:
            for name, parameter in self.weights.items():
                ema_update_(local(self.ema[name]), local(parameter), self.decay)
        if self.steps % self.reset_every == 0:
            for name, parameter in self.weights.items():
                local(parameter).copy_(local(self.ema[name]))
                local(self.ema[name]).copy_(self.initial[name])
            if self.reset_optimizer:
                for optimizer in trainer.optimizers:
                    optimizer.state.clear()
            self.resets += 1
            rank_zero_info(f"ElasticReset: reset {self.resets} at optimizer step {self.steps}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        pl_module.log("elastic_reset/resets", float(self.resets), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "resets": self.resets}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps, self.resets = state_dict["steps"], state_dict["resets"]
