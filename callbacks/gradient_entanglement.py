"""Gradient entanglement monitor (Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment:
Gradient Entanglement", Sec. 3-4).

A margin loss ℓ(m) moves log π(y_w) − log π(y_l) in the direction of −ℓ'(m). Whether each side moves the way the
loss intends depends on the per-pair gradients g_w = ∇ log π(y_w|x), g_l = ∇ log π(y_l|x) and the loss's margin
coefficients (c_w, c_l): a step moves log π(y_w) by −ℓ'(m)·(c_w·‖g_w‖² − c_l·⟨g_w,g_l⟩) and log π(y_l) by
−ℓ'(m)·(c_w·⟨g_w,g_l⟩ − c_l·‖g_l‖²) (``lit_align.gradients.margin_coefficients``). While the loss widens the margin
(−ℓ' > 0) the chosen log-prob falls when c_l·⟨g_w,g_l⟩ > c_w·‖g_w‖² and the rejected one rises when
c_w·⟨g_w,g_l⟩ > c_l·‖g_l‖²; where it narrows the margin (−ℓ' < 0: IPO past 1/(2β), cDPO once σ(m) > 1−ε) both moves
flip, and where ℓ' = 0 (hinge past its margin) nothing moves. The sign is taken per pair from the module's
``pair_loss_slope`` (``lit_align.gradients.margin_loss_slope``). Every ``every_n_steps`` this callback measures, on a
fixed probe set of pairs, the exact per-pair inner products and norms, and logs under ``entanglement/``:

* ``inner``, ``cosine``, ``norm_sq_chosen``, ``norm_sq_rejected`` (means over the probe pairs);
* ``ratio_chosen`` = ⟨g_w,g_l⟩/‖g_w‖² and ``ratio_rejected`` = ⟨g_w,g_l⟩/‖g_l‖² (per-pair, then averaged; the
  authors' code divides by ‖g_w‖² only);
* ``chosen_falls``, ``rejected_rises``: fractions of probe pairs whose own step (first order) lowers the chosen /
  raises the rejected log-prob, with the sign of ℓ' of each pair;
* ``condition_failed``: fraction of pairs where a log-prob moves against the loss's own intent (the chosen against
  the margin's direction, or the rejected with it) — the entanglement condition c_l·⟨g_w,g_l⟩ > c_w·‖g_w‖² or
  c_w·⟨g_w,g_l⟩ > c_l·‖g_l‖², which does not depend on the sign of ℓ'; pairs with ℓ' = 0 do not count;
* ``margin_narrowing``: fraction of pairs whose loss narrows the margin (−ℓ' < 0);
* ``logps_chosen``, ``logps_rejected``: the probe's mean sequence log-probs, whose trend over training is the
  symptom the paper plots; ``seconds``: the cost of the call.

At the end of fit it writes ``gradient_entanglement.json`` (the history) and ``gradient_entanglement.png``.

Gradients are taken one sequence at a time by ``backward`` into ``.grad`` (the training gradients are set aside
and restored). Every rank measures the same pairs in lockstep: under DDP the result is local and identical on all
ranks; under FSDP2 each rank holds a shard of each gradient, so the partial sums are added across ranks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from callbacks.base import AlignmentCallback
from datamodules.keys import (
    CHOSEN_ATTENTION_MASK,
    CHOSEN_COMPLETION_MASK,
    CHOSEN_INPUT_IDS,
    REJECTED_ATTENTION_MASK,
    REJECTED_COMPLETION_MASK,
    REJECTED_INPUT_IDS,
)
from lit_align.base import AlignmentModule
from lit_align.gradients import MIN_GRADIENT_NORM, entanglement_condition

SIDES = (
    (CHOSEN_INPUT_IDS, CHOSEN_ATTENTION_MASK, CHOSEN_COMPLETION_MASK),
    (REJECTED_INPUT_IDS, REJECTED_ATTENTION_MASK, REJECTED_COMPLETION_MASK),
)
PREFIX = "entanglement/"


class GradientEntanglementMonitor(AlignmentCallback):
    """Per-pair gradient inner products, entanglement ratios and log-prob trends on a fixed probe set.

    Works with any module that has ``pair_margin_coefficients(batch) -> (c_w, c_l)`` and
    ``pair_loss_slope(batch, split) -> −ℓ'(m)`` per pair (DPOModule, KTOModule).

    Args:
        every_n_steps: measure after every this many optimizer steps (and once before the first).
        num_pairs: size of the probe set: the first rows of ``split`` in pair mode.
        split: "val" (default) or "train".
        parameters: regex on parameter names to restrict the gradients (e.g. ``layers\\.2[6-9]\\.``) for speed;
            ``None`` = every trainable parameter.
        output_dir: where the JSON and PNG go (default: the trainer's log dir).
        plot: write the PNG at the end of fit.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_pairs: int = 16,
        split: str = "val",
        parameters: str | None = None,
        output_dir: str | None = None,
        plot: bool = True,
    ) -> None:
        if every_n_steps < 1 or num_pairs < 1:
            raise ValueError(f"every_n_steps and num_pairs must be >= 1, got {every_n_steps} and {num_pairs}")
        if parameters is not None:
            re.compile(parameters)
        self.every_n_steps, self.num_pairs, self.split = every_n_steps, num_pairs, split
        self.parameters, self.output_dir, self.plot = parameters, output_dir, plot
        self.history: list[dict[str, float]] = []
        self.probe: dict[str, Any] | None = None

    # ---- hooks ----------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not (hasattr(pl_module, "pair_margin_coefficients") and hasattr(pl_module, "pair_loss_slope")):
            raise TypeError(
                f"GradientEntanglementMonitor needs a margin-based module with pair_margin_coefficients and "
                f"pair_loss_slope (DPOModule, KTOModule); got {type(pl_module).__name__}"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "probe_batch"):
            raise TypeError("GradientEntanglementMonitor needs a lit-align DataModule (it reads probe pairs from it)")
        self.probe = trainer.strategy.batch_to_device(datamodule.probe_batch(self.split, "pair", self.num_pairs))
        if not any(entry["step"] == trainer.global_step for entry in self.history):
            self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and (not self.history or self.history[-1]["step"] != step):
            self.measure(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        # trainer.log_dir broadcasts from rank 0, so every rank must ask for it before the non-zero ranks leave
        directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "gradient_entanglement.json").write_text(json.dumps(self.history, indent=1))
        if self.plot:
            path = plot_entanglement({type(pl_module).__name__: self.history}, directory / "gradient_entanglement.png")
            rank_zero_info(f"GradientEntanglementMonitor: wrote {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    # ---- the measurement ------------------------------------------------------------------------------------

    def selected_parameters(self, pl_module: AlignmentModule) -> list[nn.Parameter]:
        return pl_module.parameters_matching(self.parameters, "GradientEntanglementMonitor(parameters)")

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Measure the probe set now, log the metrics and append them to ``history``."""
        start = time.perf_counter()
        products = pair_gradient_products(
            pl_module, self.probe, self.selected_parameters(pl_module), trainer.precision_plugin.forward_context
        )
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            c_chosen, c_rejected = (c.float() for c in pl_module.pair_margin_coefficients(self.probe))
            slope = pl_module.pair_loss_slope(self.probe, self.split)
        metrics = entanglement_summary(products, c_chosen, c_rejected, slope)
        metrics["seconds"] = time.perf_counter() - start
        entry = {"step": trainer.global_step, **metrics}
        self.history.append(entry)
        for logger in trainer.loggers:
            logger.log_metrics({PREFIX + k: v for k, v in metrics.items()}, step=trainer.global_step)
        return entry


def pair_gradient_products(
    module: nn.Module, probe: Mapping[str, Tensor], parameters: Sequence[nn.Parameter], forward_context=None
) -> dict[str, Tensor]:
    """Exact ⟨g_w,g_l⟩, ‖g_w‖², ‖g_l‖² and the log-probs of every probe pair, each ``[P]`` (float64 sums).

    ``module.policy_logprobs`` gives the sequence log-probs; each sequence is run alone (its padding cut off).
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    set_aside = [p.grad for p in trainable]
    sharded = any(isinstance(p, DTensor) for p in parameters)
    rows = []
    try:
        for i in range(probe[CHOSEN_INPUT_IDS].shape[0]):
            grads, logps = [], []
            for keys in SIDES:
                ids, attention, completion = (probe[key][i : i + 1] for key in keys)
                length = int(attention[0].nonzero().max()) + 1
                for p in trainable:
                    p.grad = None
                with forward_context() if forward_context else torch.enable_grad():
                    logp = module.policy_logprobs(ids[:, :length], attention[:, :length], completion[:, :length])
                logp = logp.logps.sum()
                # FSDP2 parameters are not leaves of this graph (their all-gathered copies are), so `inputs=` is
                # only a shortcut when unsharded.
                logp.backward(inputs=None if sharded else list(parameters))
                grads.append([_local(p) for p in parameters])
                logps.append(logp.detach().double())
            chosen, rejected = grads
            inner = sum((a.double() * b.double()).sum() for a, b in zip(chosen, rejected, strict=True))
            chosen_sq = sum(a.double().pow(2).sum() for a in chosen)
            rejected_sq = sum(b.double().pow(2).sum() for b in rejected)
            rows.append(torch.stack([inner, chosen_sq, rejected_sq, *logps]))
    finally:
        for p, grad in zip(trainable, set_aside, strict=True):
            p.grad = grad
    table = torch.stack(rows)
    if sharded:
        partial = table[:, :3].contiguous()
        dist.all_reduce(partial)  # the shards' partial sums → the full inner products and norms
        table = torch.cat([partial, table[:, 3:]], dim=1)
    inner, chosen_norm_sq, rejected_norm_sq, chosen_logps, rejected_logps = table.unbind(dim=1)
    return {
        "inner": inner,
        "chosen_norm_sq": chosen_norm_sq,
        "rejected_norm_sq": rejected_norm_sq,
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
    }


def _local(parameter: nn.Parameter) -> Tensor:
    """The rank's part of a parameter's gradient (zeros if it got none)."""
    grad = parameter.grad
    if grad is None:
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        return torch.zeros_like(local)
    if isinstance(grad, DTensor):
        if not all(isinstance(placement, Shard) for placement in grad.placements):
            raise NotImplementedError(f"gradient placements {grad.placements} (only FSDP2's Shard is supported)")
        grad = grad.to_local()
    return grad


def entanglement_summary(
    products: Mapping[str, Tensor], c_chosen: Tensor, c_rejected: Tensor, slope: Tensor
) -> dict[str, float]:
    """Means over the probe pairs of the quantities listed in the module docstring; ``slope`` = −ℓ'(m) per pair."""
    inner, chosen_sq, rejected_sq = products["inner"], products["chosen_norm_sq"], products["rejected_norm_sq"]
    c_chosen, c_rejected, slope = c_chosen.to(inner), c_rejected.to(inner), slope.to(inner)
    floor = MIN_GRADIENT_NORM**2
    chosen_falls, rejected_rises = entanglement_condition(inner, chosen_sq, rejected_sq, c_chosen, c_rejected, slope)
    # against the loss's intent, whichever way it pushes the margin: the geometry with a positive slope
    chosen_against, rejected_against = entanglement_condition(
        inner, chosen_sq, rejected_sq, c_chosen, c_rejected, torch.ones_like(slope)
    )
    values = {
        "inner": inner,
        "cosine": inner / (chosen_sq * rejected_sq).sqrt().clamp_min(floor),
        "norm_sq_chosen": chosen_sq,
        "norm_sq_rejected": rejected_sq,
        "ratio_chosen": inner / chosen_sq.clamp_min(floor),
        "ratio_rejected": inner / rejected_sq.clamp_min(floor),
        "chosen_falls": chosen_falls.double(),
        "rejected_rises": rejected_rises.double(),
        "condition_failed": ((chosen_against | rejected_against) & (slope != 0)).double(),
        "margin_narrowing": (slope < 0).double(),
        "coefficient_ratio": c_chosen / c_rejected,
        "logps_chosen": products["chosen_logps"],
        "logps_rejected": products["rejected_logps"],
    }
    return {name: float(value.mean()) for name, value in values.items()}


def plot_entanglement(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """One figure over training steps, one colour per run in ``histories``: the change of the probe log-probs
    (chosen solid, rejected dashed), the two entanglement ratios, and the fraction of pairs failing the condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, history), colour in zip(histories.items(), colours, strict=False):
        steps = [entry["step"] for entry in history]
        column = {key: [entry[key] for entry in history] for key in history[0]}
        for key, style, side in (("logps_chosen", "-o", "y_w"), ("logps_rejected", "--s", "y_l")):
            change = [value - column[key][0] for value in column[key]]
            axes[0].plot(steps, change, style, color=colour, ms=3, label=f"{label}: log π({side})")
        axes[1].plot(steps, column["ratio_chosen"], "-o", color=colour, ms=3, label=f"{label}: ⟨g_w,g_l⟩/‖g_w‖²")
        axes[1].plot(steps, column["ratio_rejected"], "--s", color=colour, ms=3, label=f"{label}: ⟨g_w,g_l⟩/‖g_l‖²")
        axes[2].plot(steps, column["condition_failed"], "-o", color=colour, ms=3, label=label)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    titles = (
        "probe log-probs (change since the first point)",
        "entanglement ratios (DPO threshold 1)",
        "pairs failing the condition",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
