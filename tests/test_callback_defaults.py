"""The callbacks' defaults do what their papers' reported numbers did (issue 13), each checked against an
independent computation: WiSE-FT/HMA under LoRA interpolates the *effective* weights, OnDARE's mean update is the
unbiased (1 − α)·Δθ + α·τ, and Elastic Reset counts EMA updates and resets in training batches (PPO iterations)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from helpers import fit, hh_pairs
from recording import Recorder, snapshot

from callbacks import ElasticReset, OnlineMerging, WeightInterpolation
from callbacks.weights import layer_index
from lit_align import DPOModule
from lit_align.models import LoraSettings

# ---- WeightInterpolation under LoRA: the effective weight is interpolated ------------------------------------

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def merged_by_hand(weights: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """W = W_base + scaling·B·A for every LoRA-wrapped linear layer, by the model's own tensor names."""
    merged = {}
    for name, tensor in weights.items():
        if name.endswith(".base_layer.weight"):
            prefix = name[: -len(".base_layer.weight")]
            delta = weights[f"{prefix}.lora_B.default.weight"] @ weights[f"{prefix}.lora_A.default.weight"]
            merged[prefix.removeprefix("base_model.model.") + ".weight"] = tensor + scaling * delta
    return merged


def relative_error(got: dict, expected: dict, initial: dict) -> float:
    """‖W_got − W_expected‖ / ‖W_expected − W_init‖ over every LoRA-wrapped weight."""
    error = sum(float((got[n] - expected[n]).pow(2).sum()) for n in expected)
    size = sum(float((expected[n] - initial[n]).pow(2).sum()) for n in expected)
    return math.sqrt(error / size)


@pytest.mark.parametrize("block_alphas", [None, [0.1, 0.5]], ids=["wise-ft", "hma"])
def test_weight_interpolation_under_lora_interpolates_the_effective_weights(hh_dir, block_alphas):
    recorder = Recorder()
    module = DPOModule(model="tiny-llama", lora=LORA, learning_rate=3e-2, lr_scheduler="constant")
    interpolation = WeightInterpolation(alpha=0.3, block_alphas=block_alphas)
    fit(module, hh_pairs(hh_dir, batch_size=2), [recorder, interpolation], max_steps=4)

    scaling = LORA.alpha / LORA.r
    initial = merged_by_hand(recorder.initial, scaling)  # W_0 (+ s·B_0·A_0 = 0 with peft's init)
    trained = merged_by_hand(recorder.after[-1], scaling)  # W_T = W_0 + s·B_T·A_T
    expected = {}
    for name in initial:
        alpha = 0.3 if block_alphas is None else block_alphas[layer_index(name)]  # 2 layers, 2 blocks of 1
        expected[name] = initial[name] + alpha * (trained[name] - initial[name])
    got = dict(copy.deepcopy(module.policy).merge_and_unload().named_parameters())  # peft's own merge
    assert len(expected) == 14  # 7 linear layers × 2 decoder layers
    # the adapters really trained: the effective update and A's own change are not small
    assert all(not torch.allclose(trained[n], initial[n]) for n in initial)
    a_change = [
        float((recorder.after[-1][n] - recorder.initial[n]).norm() / recorder.initial[n].norm())
        for n in recorder.initial
        if "lora_A" in n
    ]
    assert min(a_change) > 0.05
    error = relative_error(got, expected, initial)
    print(f"relative error of the effective weights: {error:.3g}; A changed by {min(a_change):.3g}..{max(a_change):.3g}")
    assert error < 1e-5
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name


def test_weight_interpolation_refuses_lora_adapters_that_do_not_start_at_zero(hh_dir):
    class NonZeroStart(Recorder):
        """Make B_0 ≠ 0 (as a PiSSA-style or pretrained adapter would) before the interpolation snapshots θ_init."""

        def on_configure_model(self, trainer, pl_module) -> None:
            with torch.no_grad():
                for name, parameter in pl_module.policy.named_parameters():
                    if "lora_B" in name:
                        parameter.fill_(0.01)

    module = DPOModule(model="tiny-llama", lora=LORA, learning_rate=1e-2)
    with pytest.raises(ValueError, match=r"lora_A.*lora_B.*both non-zero"):
        fit(module, hh_pairs(hh_dir, batch_size=2), [NonZeroStart(), WeightInterpolation(alpha=0.3)], max_steps=1)
