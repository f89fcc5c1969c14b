"""Reference sync (TR-DPO, Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv 2404.09656, Eq. 5, soft update): every ``sync_every`` optimizer steps

    θ_ref ← α·θ_policy + (1 − α)·θ_ref

TRL's ``sync_ref_model`` with ``ref_model_mixup_alpha`` and ``ref_model_sync_steps``, with the same defaults
(α = 0.6, every 512 steps); α = 1 is the paper's hard update. Works with any module that holds a full reference
copy (DPO, KTO, PPO); not with LoRA (the reference is the policy without adapters) or precomputed reference
log-probs, which would be stale after the first sync.

Extra copies of the weights: none; the reference is updated in place (and is in the module's checkpoint).
"""

from __future__ import annotations

import lightning as L
import torch

from callbacks.base import AlignmentCallback
from callbacks.weights import local, reference_pairs


class ReferenceSync(AlignmentCallback):
    """Soft-update the reference toward the policy every ``sync_every`` optimizer steps.

    Args:
        alpha: weight of the policy in the update (TRL ``ref_model_mixup_alpha``).
        sync_every: optimizer steps between updates (TRL ``ref_model_sync_steps``).
    """

    def __init__(self, alpha: float = 0.6, sync_every: int = 512) -> None:
        if not 0.0 <= alpha <= 1.0 or sync_every < 1:
            raise ValueError(f"ReferenceSync: need 0 <= alpha <= 1 and sync_every >= 1, got {alpha}, {sync_every}")
        self.alpha, self.sync_every = alpha, sync_every
        self.steps = 0

    writes_reference = True

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, sync_every=self.sync_every)

    def on_configure_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pairs = reference_pairs(pl_module, "ReferenceSync")

    @torch.no_grad()
    def on_after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps += 1
        if self.steps % self.sync_every == 0:
            for _, policy, reference in self.pairs:
                local(reference).lerp_(local(policy).to(reference.dtype), self.alpha)

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = state_dict["steps"]
