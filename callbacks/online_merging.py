"""Online merging of every optimizer update with the reference task vector (Lu et al. 2024, "Online Merging
Optimizers for Boosting Rewards and Mitigating Tax in Alignment", arXiv 2405.17931).

With θ_base the pretrained model, θ_SFT the initial policy (= the DPO reference) and τ = θ_SFT − θ_base, each
optimizer update Δθ = θ_after − θ_before is replaced by a merge with τ (the relaxation of Eq. 2):

    OnDARE (Eq. 3–4):  θ_t = θ_{t−1} + (1 − α)·F_R(Δθ) + α·F_R(τ)
                       F_R keeps each entry with probability p (Bernoulli), the rest are zeroed
    OnTIES (Eq. 5–7):  θ_t = θ_{t−1} + (1 − α)·F_p(Δθ) ⊕ α·F_p(τ)
                       F_p keeps the top-p fraction of a tensor by |x|;  a ⊕ b = a + b where the signs agree,
                       else the larger-magnitude one

OnDARE rescales kept entries by 1/p by default (``rescale=True``), so that E[F_R(x)] = x and the expected update is

    E[θ_t − θ_{t−1}] = (1 − α)·Δθ + α·τ

This is what produced the paper's numbers: the released code (QwenLM/online_merging_optimizers) sparsifies with
``F.dropout``, which divides kept entries by p, and the paper's own argument that OnDARE is an *unbiased* random
sparsification (Sec. 5.3) holds only with it. The paper's text says it "neglects the rescaling"; that reading is
``rescale=False``, whose expected update is p·((1 − α)·Δθ + α·τ): with the default p = 0.01 a step ~100× smaller
than AdamW's at the same learning rate, so a "tax reduction" measured against AdamW would be confounded with a tiny
step. (The code's own ``--rescale`` flag is a further L1-norm matching, off in the released run; not implemented.)
Other differences from the released code are options: ``fixed_reference_mask=True`` samples the OnDARE mask of τ
once (the code) instead of every step; OnTIES's sign election compares the weighted terms α·τ and (1 − α)·Δθ as in
Eq. 7 (the code compares them unweighted). Δθ is AdamW's full update including decoupled weight decay. Note the
direction: α·F(τ) pushes the weights further along base → SFT every step; it is not an anchor toward θ_SFT.

Extra copies of the weights: τ (the size of the trainable weights; θ_SFT and θ_base are never kept) and the
pre-step weights, refreshed at each step. Masks are drawn for the whole tensor from the callback's own seeded
generator (its state is checkpointed), so N processes under FSDP2 draw the same masks as one process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.base import AlignmentCallback
from callbacks.weights import attach_store, full, local, shard_like


def top_fraction_mask(values: Tensor, keep: float) -> Tensor:
    """True for the ⌈keep·n⌉ largest |values| of the tensor (ties broken by position)."""
    count = max(1, int(round(keep * values.numel())))
    flat = values.abs().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    # a stable sort, so ties (common: Adam's first update is ±lr almost everywhere) go to the lower index
    mask[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
    return mask.view_as(values)


def ondare_update(delta: Tensor, tau: Tensor, keep_delta: Tensor, keep_tau: Tensor, alpha: float, p: float,
                  rescale: bool) -> Tensor:  # fmt: skip
    """(1 − α)·F_R(Δθ) + α·F_R(τ) with given keep masks; ``rescale`` divides kept entries by p."""
    scale = 1.0 / p if rescale else 1.0
    return (1 - alpha) * scale * delta * keep_delta + alpha * scale * tau * keep_tau


def onties_update(delta: Tensor, tau: Tensor, keep_delta: Tensor, keep_tau: Tensor, alpha: float) -> Tensor:
    """(1 − α)·F_p(Δθ) ⊕ α·F_p(τ): sum where signs agree (or one side is zero), else the larger magnitude."""
    a = (1 - alpha) * delta * keep_delta
    b = alpha * tau * keep_tau
    agree = torch.sign(a) * torch.sign(b) >= 0
    return torch.where(agree, a + b, torch.where(a.abs() >= b.abs(), a, b))


class OnlineMerging(AlignmentCallback):
    """Merge each optimizer update with τ = θ_SFT − θ_base (OnDARE or OnTIES).

    Args:
        base_model: the pretrained model the SFT policy came from (Hub id, directory or lit-align alias).
        method: ``ondare`` or ``onties``.
        alpha: merging weight α (paper: search from 1e-7; Table 2 sweeps 1e-7 … 1e-4).
        keep: reserve rate p, the fraction of entries kept by F (paper: robust down to 5e-4; code default 0.01).
        rescale: divide kept OnDARE entries by p (default: the released code's ``F.dropout``, an unbiased update);
            False keeps them as they are (the paper's wording; the expected update shrinks by p).
        fixed_reference_mask: OnDARE samples τ's mask once per run (released code) instead of every step.
        seed: seed of the mask generator.
    """

    def __init__(
        self,
        base_model: str,
        method: Literal["ondare", "onties"] = "ondare",
        alpha: float = 1e-7,
        keep: float = 0.01,
        rescale: bool = True,
        fixed_reference_mask: bool = False,
        seed: int = 0,
    ) -> None:
        if method not in ("ondare", "onties"):
            raise ValueError(f"OnlineMerging: method must be 'ondare' or 'onties', got {method!r}")
        if not 0.0 < keep <= 1.0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"OnlineMerging: need 0 < keep <= 1 and 0 <= alpha <= 1, got keep={keep}, alpha={alpha}")
        self.base_model, self.method, self.alpha, self.keep = base_model, method, alpha, keep
        self.rescale, self.fixed_reference_mask, self.seed = rescale, fixed_reference_mask, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(base_model=self.base_model, method=self.method, alpha=self.alpha)

    @torch.no_grad()
    def on_configure_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit_align.models import load_causal_lm

        self.weights = pl_module.trainable_named_parameters()
        if "online_merging_tau" in pl_module.callback_weights:
            self.tau = pl_module.callback_weights["online_merging_tau"]
        else:
            base = dict(load_causal_lm(self.base_model).named_parameters())
            tau = {}
            for name, parameter in self.weights.items():
                base_name = pl_module.policy_tensor_name(name) or name
                if base_name not in base or base[base_name].shape != parameter.shape:
                    raise ValueError(
                        f"OnlineMerging: base model {self.base_model} has no tensor '{base_name}' of shape "
                        f"{tuple(parameter.shape)}; it must be the model the policy was fine-tuned from (no LoRA)"
                    )
                tau[name] = parameter.detach().clone()  # a DTensor under FSDP2, so the store keeps its layout
                local(tau[name]).sub_(shard_like(base[base_name].detach(), parameter))
            del base
            if _all_zero(tau.values()):
                rank_zero_warn(
                    f"OnlineMerging: the task vector τ = θ_SFT − θ_base is all zeros: base_model {self.base_model!r} "
                    "has the same weights as the initial policy, so merging with τ is a no-op (each update is only "
                    "sparsified and scaled by 1 − α). Set base_model to the pretrained model the policy was "
                    "fine-tuned from."
                )
            self.tau = attach_store(pl_module, "online_merging_tau", tau)
            if self.method == "onties":  # F_p(τ) is the same every step: trim once
                for name, parameter in self.weights.items():
                    whole = full(self.tau.whole(name))
                    self.tau[name].mul_(shard_like(top_fraction_mask(whole, self.keep), parameter))
        self.track(self.weights, self.tau)

    def track(self, weights: dict[str, Tensor], tau) -> None:
        """Merge every update of ``weights`` (name → parameter) with ``tau`` (name → this rank's τ shard) from now
        on: what ``on_configure_model`` sets up once the models exist."""
        self.weights, self.tau = weights, tau
        self.reference_masks: dict[str, Tensor] = {}
        self.before = {name: local(p).detach().clone() for name, p in self.weights.items()}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        for name, parameter in self.weights.items():
            self.before[name].copy_(local(parameter))

    def bernoulli_mask(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A keep-mask of the whole tensor's shape from our generator (same on every rank), cut to this shard."""
        whole = torch.rand(like.shape, generator=generator or self.generator) < self.keep
        return shard_like(whole, like)

    def fixed_mask(self, name: str, like: Tensor) -> Tensor:
        """τ's one mask per run, from its own generator (seed + 1): drawn again identically after a resume."""
        if not self.reference_masks:
            generator = torch.Generator().manual_seed(self.seed + 1)
            self.reference_masks = {n: self.bernoulli_mask(p, generator) for n, p in self.weights.items()}
        return self.reference_masks[name]

    @torch.no_grad()
    def merged_update(self, name: str, parameter: Tensor, delta: Tensor) -> Tensor:
        """The update that replaces the optimizer's ``delta`` (this rank's shard) of tensor ``name``, drawing the
        OnDARE masks from the callback's generator."""
        tau = self.tau[name]
        if self.method == "ondare":
            keep_tau = self.fixed_mask(name, parameter) if self.fixed_reference_mask else self.bernoulli_mask(parameter)
            keep_delta = self.bernoulli_mask(parameter)
            return ondare_update(delta, tau, keep_delta, keep_tau, self.alpha, self.keep, self.rescale)
        whole_delta = full(_as_sharded(delta, parameter))
        keep_delta = shard_like(top_fraction_mask(whole_delta, self.keep), parameter)
        return onties_update(delta, tau, keep_delta, tau != 0, self.alpha)

    @torch.no_grad()
    def on_after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps += 1
        for name, parameter in self.weights.items():
            current, before = local(parameter), self.before[name]
            current.copy_(before + self.merged_update(name, parameter, current - before))
        if self.steps == 1:
            settings = f"{self.method}, alpha={self.alpha}, keep={self.keep}, rescale={self.rescale}"
            rank_zero_info(f"OnlineMerging ({settings}) merges every update")

    def state_dict(self) -> dict:
        return {"steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = state_dict["steps"]
        self.generator.set_state(state_dict["generator"])


def _all_zero(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor (this rank's shards) is zero on every rank: one all-reduce when a process group is up."""
    tensors = [local(t) for t in tensors]
    if not tensors:
        return False
    nonzero = sum(
        (torch.count_nonzero(t) for t in tensors), torch.zeros((), dtype=torch.long, device=tensors[0].device)
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(nonzero)
    return int(nonzero) == 0


def _as_sharded(values: Tensor, like: Tensor) -> Tensor:
    """A local shard as a DTensor laid out like ``like`` (so ``full`` can gather it); plain tensors pass through."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(values, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return values
