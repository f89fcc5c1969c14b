"""Weight interpolation between the initial and the trained policy: WiSE-FT / model averaging and its
heterogeneous variant (HMA).

    θ = (1 − α)·θ_init + α·θ_trained                          (Wortsman et al. 2022, Eq. 1; Lin et al. 2024, MA)
    θ^[k] = (1 − α_k)·θ_init^[k] + α_k·θ_trained^[k],  mean_k α_k = α   (Lin et al. 2024, HMA, Eq. 2–3, set Ω)

α is the weight of the *trained* model, as in both papers' equations (Lin et al.'s released code puts it on the
pre-RLHF model instead: their α = 0.2 is our α = 0.8). HMA splits the decoder layers into K contiguous blocks of
⌊L/K⌋ layers, the remainder going to the last block (as the released code's ``blockN``); tensors outside the
layers (embeddings, final norm, output layer) use the global α. Lin et al. fit the α_k by proxy distillation; here
they are given.

Under LoRA the interpolation is of the *effective* weights W = W_0 + s·B·A, as WiSE-FT/MA define it on the
merged model: interpolating A and B separately would give W_0 + s·αB_T·(A_0 + α(A_T − A_0)) instead of
W_0 + α·s·B_T·A_T (measured: 30–40 % relative error on the interpolated update of a tiny Llama). The update s·B·A is
bilinear, so scaling the factor that starts at zero by α (B under peft's default init, A for embedding adapters) and
keeping the other at its trained value gives W_0 + α·(W_T − W_0) exactly, α_k per HMA block likewise, at no cost.
An adapter whose two factors both start non-zero (PiSSA/OLoRA-style init, a pretrained adapter) has no such exact
form — (1 − α)·B_0A_0 + α·B_TA_T needs rank 2r — and is refused at setup, as are LoRA tensors other than A/B pairs
(DoRA magnitudes). Tensors trained in full next to the adapters (a value head, ``modules_to_save``) are
interpolated as usual.

Applied when training ends, before ``export_dir`` is written. ``sweep`` evaluates a list of α on the validation
set first and logs one point per α (``interpolation/alpha`` plus every ``eval_*`` metric), so one run yields a
reward-vs-drift curve; the weights are then left at ``alpha``.

Extra copies of the weights: none while training if the frozen reference still holds θ_init (it is read from
there); otherwise θ_init (the size of the trainable weights). Plus θ_trained while a sweep runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.base import AlignmentCallback
from callbacks.weights import WeightStore, initial_weights, interpolate, layer_index, local, nonzero_anywhere

_LORA_FACTOR = re.compile(r"\.lora_(embedding_)?([AB])(?=\.|$)")


def block_alpha_per_layer(num_layers: int, block_alphas: list[float]) -> list[float]:
    """The ratio of each of ``num_layers`` layers under K = len(block_alphas) contiguous blocks of ⌊L/K⌋ layers
    (the last block takes the remainder)."""
    blocks = len(block_alphas)
    if not 1 <= blocks <= num_layers:
        raise ValueError(f"HMA: {blocks} blocks for {num_layers} layers; need 1 <= K <= number of layers")
    size = num_layers // blocks
    return [block_alphas[min(layer // size, blocks - 1)] for layer in range(num_layers)]


def lora_factors_kept(initial: Mapping[str, Tensor]) -> set[str]:
    """The LoRA factors to keep at their trained value when interpolating ``initial`` → trained weights.

    ΔW = s·B·A is bilinear: with one factor zero at the start, interpolating that factor alone (α·B_T) and keeping
    the other (A_T) gives W_0 + α·s·B_T·A_T, the interpolation of the effective weight. Per pair the factor that
    starts at zero is interpolated (B for peft's linear layers, A for its embedding adapters); a pair with both
    factors non-zero at the start, or a LoRA tensor that is not half of an A/B pair, is a ``ValueError``.
    """
    lora = [name for name in initial if ".lora_" in name]
    nonzero = dict(zip(lora, nonzero_anywhere(initial[name] for name in lora), strict=True))
    kept = set()
    for name in lora:
        match = _LORA_FACTOR.search(name)
        if match is None:
            raise ValueError(
                f"WeightInterpolation: the LoRA tensor '{name}' is not an A or B factor (DoRA magnitude?); only "
                "plain A/B adapters can be interpolated exactly. Train without it, or without LoRA"
            )
        if match.group(2) == "B":
            continue
        b_name = name[: match.start()] + f".lora_{match.group(1) or ''}B" + name[match.end() :]
        if b_name not in nonzero:
            raise ValueError(f"WeightInterpolation: LoRA factor '{name}' has no trainable partner '{b_name}'")
        if not nonzero[b_name]:
            kept.add(name)  # B_0 = 0 (peft's default): scale B, keep A
        elif not nonzero[name]:
            kept.add(b_name)  # A_0 = 0 (peft's embedding adapters): scale A, keep B
        else:
            raise ValueError(
                f"WeightInterpolation: LoRA factors '{name}' and '{b_name}' are both non-zero at the start of "
                "training, so the initial adapter update B_0·A_0 is not zero and the interpolated weight "
                "(1 − α)·B_0A_0 + α·B_TA_T cannot be written in the adapters. Interpolate merged models instead "
                "(export both and average them), or start the adapter with B = 0 (peft's default)"
            )
    return kept


class WeightInterpolation(AlignmentCallback):
    """Interpolate the trained policy toward its initial weights at the end of training.

    Args:
        alpha: weight of the trained model (1 keeps it, 0 returns to the initial model).
        block_alphas: HMA ratios α_1..α_K of K contiguous layer blocks, input side first; their mean must equal
            ``alpha`` (Lin et al.'s constraint Ω).
        sweep: α values to evaluate on the validation set before applying ``alpha``; one logged point each.
        include_value_head: also interpolate PPO's value head / value model.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        block_alphas: list[float] | None = None,
        sweep: list[float] | None = None,
        include_value_head: bool = False,
    ) -> None:
        for value in [alpha, *(block_alphas or []), *(sweep or [])]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"WeightInterpolation: every ratio must be in [0, 1], got {value}")
        if block_alphas is not None:
            mean = sum(block_alphas) / len(block_alphas)
            if abs(mean - alpha) > 1e-6:
                raise ValueError(f"WeightInterpolation: block_alphas {block_alphas} average {mean:.6g}, not {alpha}")
            if sweep:
                raise ValueError("WeightInterpolation: a sweep varies one global alpha; drop block_alphas or sweep")
        self.alpha, self.block_alphas, self.sweep = alpha, block_alphas, list(sweep or [])
        self.include_value_head = include_value_head
        self.results: list[dict[str, float]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, block_alphas=self.block_alphas, sweep=self.sweep)

    def on_configure_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights = pl_module.trainable_named_parameters(include_extra=self.include_value_head)
        self.initial = initial_weights(trainer, pl_module, "interpolation_initial", self.weights)
        self.kept = lora_factors_kept(self.initial)  # empty without LoRA

    def ratios(self, alpha: float) -> dict[str, float]:
        """α for every tensor: ``alpha`` everywhere, or the HMA block ratio inside the decoder layers (for a LoRA
        pair, the ratio of its zero-initialised factor; the other stays trained, see ``lora_factors_kept``)."""
        if self.block_alphas is None:
            return {name: alpha for name in self.weights}
        layers = {name: layer_index(name) for name in self.weights}
        found = [index for index in layers.values() if index is not None]
        if not found:
            raise ValueError("WeightInterpolation: block_alphas given but no decoder layers found in tensor names")
        per_layer = block_alpha_per_layer(max(found) + 1, self.block_alphas)
        return {name: alpha if index is None else per_layer[index] for name, index in layers.items()}

    @torch.no_grad()
    def apply(self, alpha: float, trained: WeightStore) -> None:
        for name, ratio in self.ratios(alpha).items():
            if name in self.kept:  # the LoRA factor that started non-zero: its partner carries α
                local(self.weights[name]).copy_(trained[name])
            else:
                local(self.weights[name]).copy_(interpolate(self.initial[name], trained[name], ratio))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained = WeightStore(self.weights)
        for alpha in self.sweep:
            self.apply(alpha, trained)
            metrics = run_validation(trainer)
            if not metrics:
                rank_zero_warn("WeightInterpolation: the sweep found no validation metrics (no validation data?)")
            point = {"interpolation/alpha": alpha, **metrics}
            self.results.append(point)
            for logger in trainer.loggers:
                logger.log_metrics(point, step=trainer.global_step)
            rank_zero_info(f"WeightInterpolation sweep: {point}")
        log_dir = trainer.log_dir if self.sweep else None  # a collective (broadcast from rank 0): ask on every rank
        if log_dir is not None and trainer.is_global_zero:
            path = Path(log_dir) / "interpolation_sweep.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.results, indent=1))
        self.apply(self.alpha, trained)

    def state_dict(self) -> dict:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = state_dict["results"]


def run_validation(trainer: L.Trainer) -> dict[str, float]:
    """Run the fit's validation loop now and return its ``eval_*`` metrics.

    Lightning offers no public call for this inside ``fit`` (``trainer.validate`` cannot nest); this does what the
    training loop does at ``val_check_interval``.
    """
    stage = trainer.state.stage
    trainer.validating = True
    trainer.fit_loop.epoch_loop.val_loop.run()
    trainer.state.stage = stage
    return {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith("eval_") and value.numel() == 1
    }
