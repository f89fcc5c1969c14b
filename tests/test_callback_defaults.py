"""The callbacks' defaults do what their papers' reported numbers did (issue 13), each checked against an
independent computation: WiSE-FT/HMA under LoRA interpolates the *effective* weights, OnDARE's mean update is the
unbiased (1 − α)·Δθ + α·τ, and Elastic Reset counts EMA updates and resets in training batches (PPO iterations)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import fit, hh_pairs, quiet_trainer
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
    torch.manual_seed(0)  # LoRA's A init
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
    # before the fix (A and B interpolated separately): 0.41 (WiSE-FT) and 0.31 (HMA)
    assert relative_error(got, expected, initial) < 1e-5
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


# ---- OnDARE: the default update is unbiased ---------------------------------------------------------------------

# six hand-picked entries, tiled 1000 times: every entry of the tensor gets its own Bernoulli draws, so each of the six
# values is sampled 1000 times per update (400 000 times in all)
TILES, DRAWS = 1000, 400
THETA = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.25], dtype=torch.float64)
GRAD = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25], dtype=torch.float64)
TAU = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5, 0.2], dtype=torch.float64)
ALPHA = 0.25


def tiled(values: torch.Tensor) -> torch.Tensor:
    return values.repeat(TILES)


def check_mean_update(updates: list[torch.Tensor], delta: torch.Tensor, keep: float) -> None:
    """The mean of the sampled updates is (1 − α)·Δθ + α·τ within 5 standard errors, for each of the six values.

    Each entry is (1 − α)·Δθ·b/p + α·τ·b'/p with independent Bernoulli(p) b, b': mean (1 − α)·Δθ + α·τ,
    variance ((1 − α)·Δθ)²·(1 − p)/p + (α·τ)²·(1 − p)/p.
    """
    samples = torch.stack(updates).reshape(-1, len(delta))  # (draws × tiles, 6)
    expected = (1 - ALPHA) * delta + ALPHA * TAU
    variance = ((1 - ALPHA) * delta) ** 2 * (1 - keep) / keep + (ALPHA * TAU) ** 2 * (1 - keep) / keep
    standard_error = (variance / samples.shape[0]).sqrt()
    mean = samples.mean(0)
    assert ((mean - expected).abs() < 5 * standard_error).all(), (mean, expected, standard_error)
    assert (standard_error < 0.2 * expected.abs()).all()  # tight enough to tell the unbiased mean from p times it
    # the spread matches too: each entry is kept with probability p and then scaled by 1/p
    assert torch.allclose(samples.var(0), variance, rtol=0.25)


def test_ondare_default_update_is_unbiased_over_many_draws():
    delta = tiled(torch.tensor([0.1, -0.3, 0.05, 0.2, -0.1, 0.4], dtype=torch.float64))
    merging = OnlineMerging(base_model="unused", alpha=ALPHA, seed=11)  # default keep 0.01, default rescale
    assert merging.keep == 0.01 and merging.rescale
    parameter = torch.nn.Parameter(tiled(THETA))
    merging.track({"w": parameter}, {"w": tiled(TAU)})
    updates = [merging.merged_update("w", parameter, delta) for _ in range(DRAWS)]
    check_mean_update(updates, delta[:6], keep=merging.keep)

    # the paper's wording (no rescale) stays an option: the same masks, no 1/p, so a mean p times smaller
    unscaled = OnlineMerging(base_model="unused", alpha=ALPHA, seed=11, rescale=False)
    unscaled.track({"w": parameter}, {"w": tiled(TAU)})
    for update in updates:
        assert torch.allclose(unscaled.merged_update("w", parameter, delta), update * unscaled.keep)


def test_ondare_default_update_is_unbiased_through_a_real_adamw_step():
    lr, weight_decay, eps = 0.1, 0.5, 1e-8
    # AdamW's first step by hand: θ ← θ·(1 − lr·wd), then m̂ = g, v̂ = g², θ ← θ − lr·g/(|g| + eps)
    delta = -lr * weight_decay * THETA - lr * GRAD / (GRAD.abs() + eps)
    merging = OnlineMerging(base_model="unused", alpha=ALPHA, seed=5)
    parameter = torch.nn.Parameter(tiled(THETA))
    merging.track({"w": parameter}, {"w": tiled(TAU)})
    updates = []
    for _ in range(DRAWS):
        with torch.no_grad():
            parameter.copy_(tiled(THETA))
        optimizer = torch.optim.AdamW([parameter], lr=lr, weight_decay=weight_decay, eps=eps)
        (tiled(GRAD) * parameter).sum().backward()
        merging.on_before_optimizer_step(None, None, optimizer)
        optimizer.step()
        merging.on_after_optimizer_step(None, None)
        parameter.grad = None
        updates.append(parameter.detach() - tiled(THETA))
    assert merging.steps == DRAWS
    check_mean_update(updates, delta, keep=merging.keep)


# ---- Elastic Reset counts PPO iterations (training batches), not optimizer steps -------------------------------


class AtBatchEnd(Recorder):
    """The policy (and Elastic Reset's stored EMA, when there is one) at the end of every training batch; placed
    before ElasticReset it sees θ before the EMA update and reset, placed after it the result."""

    def __init__(self) -> None:
        super().__init__()
        self.policy: list[dict[str, torch.Tensor]] = []
        self.ema: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.policy.append(snapshot(pl_module.policy))
        store = pl_module.callback_weights["elastic_reset_ema"]
        self.ema.append({name.removeprefix("policy."): store[name].clone() for name in store.names})


def ppo(**overrides):
    from lit_align.ppo import PPOModule
    from lit_align.rewards import CallableReward

    settings = dict(
        model="tiny-llama",
        reward=CallableReward(lambda prompts, completions: [float(len(c)) for c in completions]),
        advantage_estimator="gae",
        sampling={"max_new_tokens": 3},
        ppo_epochs=2,
        num_mini_batches=2,  # 4 prompts per rollout: 2 minibatches of 2
        learning_rate=1e-2,
        lr_scheduler="constant",
    )
    settings.update(overrides)
    return PPOModule(**settings)


def test_elastic_reset_on_ppo_updates_the_ema_once_per_rollout_and_resets_every_n_rollouts(hh_dir):
    decay = 0.5
    before, reset, after = AtBatchEnd(), ElasticReset(reset_every=2, decay=decay), AtBatchEnd()
    module = ppo()
    torch.manual_seed(0)
    trainer = fit(module, hh_pairs(hh_dir), [before, reset, after], max_steps=16)  # 4 rollouts × 2 × 2 steps

    assert reset.resets == 2  # after rollouts 2 and 4
    assert module.global_step == 16 and reset.steps == 16 and len(before.policy) == 4
    assert reset.batches == 4 and reset.ema_updates == 4
    assert metric_value(trainer, "elastic_reset/resets") == 2.0
    theta0 = before.initial
    ema = {name: tensor.clone() for name, tensor in theta0.items()}
    for batch in range(4):  # the EMA and reset by hand, once per rollout
        trained = before.policy[batch]  # θ after the rollout's 4 optimizer steps
        ema = {name: decay * ema[name] + (1 - decay) * trained[name] for name in ema}
        reset_now = (batch + 1) % 2 == 0
        expected_policy = ema if reset_now else trained
        for name, parameter in after.policy[batch].items():
            assert torch.allclose(parameter, expected_policy[name], atol=1e-6), (batch, name)
        if reset_now:
            assert not torch.allclose(trained["model.norm.weight"], ema["model.norm.weight"])  # a visible reset
            ema = {name: tensor.clone() for name, tensor in theta0.items()}
        for name, stored in after.ema[batch].items():
            assert torch.allclose(stored, ema[name], atol=1e-6), (batch, name)
    # the next rollout's first optimizer step starts from the reset policy
    for name, parameter in before.before[8].items():
        assert torch.equal(parameter, after.policy[1][name]), name


def test_elastic_reset_resumed_mid_cycle_keeps_counting_rollouts(hh_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    decay = 0.5
    first, checkpoints = AtBatchEnd(), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    torch.manual_seed(0)
    fit(ppo(), hh_pairs(hh_dir), [ElasticReset(reset_every=2, decay=decay), first, checkpoints], max_steps=4)
    ema = first.ema[0]  # after rollout 1: one EMA update, no reset yet

    before, reset, after = AtBatchEnd(), ElasticReset(reset_every=2, decay=decay), AtBatchEnd()
    checkpoint = str(tmp_path / "epoch=0-step=4.ckpt")
    trainer = quiet_trainer(16, [before, reset, after])
    trainer.fit(ppo(), datamodule=hh_pairs(hh_dir), ckpt_path=checkpoint)  # weights_only: the default, safe load
    assert (reset.steps, reset.batches, reset.ema_updates, reset.resets, reset.pending) == (16, 4, 4, 2, 0)
    theta0 = before.initial
    for index, batch in enumerate(range(2, 5)):  # rollouts 2, 3, 4 after the resume
        trained = before.policy[index]
        ema = {name: decay * ema[name] + (1 - decay) * trained[name] for name in ema}
        expected_policy = ema if batch % 2 == 0 else trained
        for name, parameter in after.policy[index].items():
            assert torch.allclose(parameter, expected_policy[name], atol=1e-6), (batch, name)
        if batch % 2 == 0:
            ema = {name: tensor.clone() for name, tensor in theta0.items()}


def metric_value(trainer, name: str) -> float:
    return float(trainer.callback_metrics[name])
