"""Alignment-tax callbacks: their formulas on small tensors against hand-computed values, their effect on a real
tiny model during DPO/KTO/PPO training against an independent recomputation from the raw weights, and exact
resume from a checkpoint."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from helpers import fit, hh_pairs
from lightning.pytorch.callbacks import ModelCheckpoint
from recording import Recorder, snapshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from callbacks import ElasticReset, OnlineMerging, ReferenceSoup, ReferenceSync, WeightInterpolation
from callbacks.online_merging import ondare_update, onties_update, top_fraction_mask
from callbacks.weight_interpolation import block_alpha_per_layer
from callbacks.weights import average_state_dicts, ema_update_, interpolate, layer_index
from lit_align import DPOModule, KTOModule
from lit_align.cli import main as cli_main
from lit_align.models import LoraSettings, load_tokenizer, tiny_llama

# ---- formulas ---------------------------------------------------------------------------------------------------


def test_ema_update_matches_hand_values():
    average = torch.tensor([1.0, 2.0])
    ema_update_(average, torch.tensor([3.0, 6.0]), decay=0.75)  # 0.75·1 + 0.25·3, 0.75·2 + 0.25·6
    assert average.tolist() == [1.5, 3.0]


def test_interpolation_and_hma_blocks():
    assert interpolate(torch.tensor([0.0, 10.0]), torch.tensor([4.0, 2.0]), 0.25).tolist() == [1.0, 8.0]
    # 5 layers in 2 blocks of ⌊5/2⌋ = 2 layers, the remainder in the last block
    assert block_alpha_per_layer(5, [0.1, 0.3]) == [0.1, 0.1, 0.3, 0.3, 0.3]
    assert block_alpha_per_layer(6, [0.2, 0.5, 0.8]) == [0.2, 0.2, 0.5, 0.5, 0.8, 0.8]
    assert layer_index("policy.model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("policy.transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("policy.model.embed_tokens.weight") is None
    with pytest.raises(ValueError, match="average"):
        WeightInterpolation(alpha=0.5, block_alphas=[0.2, 0.4])


def test_soup_average_and_incompatible_checkpoints():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([4.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([0.0])}
    soup = average_state_dicts(iter([("a", a), ("b", b)]), [0.25, 0.75])
    assert soup["w"].tolist() == [2.5, 5.0] and soup["b"].tolist() == [1.0]
    with pytest.raises(ValueError, match=r"c: tensor 'w' has shape \(3,\)"):
        average_state_dicts(iter([("a", a), ("c", {"w": torch.zeros(3), "b": torch.zeros(1)})]), [0.5, 0.5])
    with pytest.raises(ValueError, match="d has no tensor 'b'"):
        average_state_dicts(iter([("a", a), ("d", {"w": torch.zeros(2)})]), [0.5, 0.5])


def test_ondare_and_onties_merges_match_hand_values():
    delta, tau = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])
    keep_delta, keep_tau = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    # 0.9·[1, 0, 3, 0] + 0.1·[0, 20, 30, 0]
    merged = ondare_update(delta, tau, keep_delta, keep_tau, alpha=0.1, p=0.5, rescale=False)
    assert torch.allclose(merged, torch.tensor([0.9, 2.0, 5.7, 0.0]))
    rescaled = ondare_update(delta, tau, keep_delta, keep_tau, alpha=0.1, p=0.5, rescale=True)
    assert torch.allclose(rescaled, torch.tensor([1.8, 4.0, 11.4, 0.0]))

    assert top_fraction_mask(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5).tolist() == [False, True, True, False]
    ones = torch.ones(4)
    # a = 0.5·Δ = [0.5, -1, 1.5, 0], b = 0.5·τ = [1, 0.5, -5, 2.5]: agree → sum; disagree → larger |·|; 0 agrees
    merged = onties_update(torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([2.0, 1.0, -10.0, 5.0]), ones, ones, 0.5)
    assert merged.tolist() == [1.5, -1.0, -5.0, 2.5]


# ---- on a real tiny model ---------------------------------------------------------------------------------------


# two DPO steps per epoch of 4 training pairs; 4 held-out pairs validate in one batch
pairs = partial(hh_pairs, batch_size=2, limit_train=4, eval_batch_size=4)


def dpo(**kwargs) -> DPOModule:
    return DPOModule(model="tiny-llama", learning_rate=1e-2, lr_scheduler="constant", **kwargs)


def test_elastic_reset_follows_the_ema_and_resets(hh_dir):
    recorder, decay = Recorder(), 0.5
    module = dpo()
    fit(module, pairs(hh_dir), [recorder, ElasticReset(reset_every=2, decay=decay)], max_steps=3)
    theta0, (theta1, theta2, theta3) = recorder.initial, recorder.after
    for name, parameter in module.policy.named_parameters():
        ema_at_reset = decay * (decay * theta0[name] + (1 - decay) * theta1[name]) + (1 - decay) * theta2[name]
        assert torch.allclose(recorder.before[2][name], ema_at_reset, atol=1e-6), name  # step 3 starts from it
        assert torch.equal(parameter, theta3[name])  # no reset after step 3
        ema_now = decay * theta0[name] + (1 - decay) * theta3[name]  # the EMA restarted from θ_0
        stored = module.callback_weights["elastic_reset_ema"][f"policy.{name}"]
        assert torch.allclose(stored, ema_now, atol=1e-6), name
    assert not torch.equal(theta2["model.norm.weight"], recorder.before[2]["model.norm.weight"])
    assert "elastic_reset_initial" not in module.callback_weights  # θ_0 is read from the frozen reference


def test_elastic_reset_with_the_ema_as_kl_reference(hh_dir):
    recorder, decay = Recorder(), 0.75
    module = dpo()
    fit(module, pairs(hh_dir), [recorder, ElasticReset(reset_every=3, decay=decay, ema_as_reference=True)], 1)
    assert "elastic_reset_ema" not in module.callback_weights  # the reference is the EMA: no extra copy
    assert "elastic_reset_initial" in module.callback_weights  # so θ_0 needs one
    references = dict(module.reference.named_parameters())
    for name, theta1 in recorder.after[0].items():
        assert torch.allclose(references[name], decay * recorder.initial[name] + (1 - decay) * theta1, atol=1e-6)


def test_elastic_reset_on_ppo_counts_every_manual_optimizer_step(hh_dir):
    from lit_align.ppo import PPOModule
    from lit_align.rewards import CallableReward

    reset = ElasticReset(reset_every=100, decay=0.9, include_value_head=True)
    module = PPOModule(
        model="tiny-llama",
        reward=CallableReward(lambda prompts, completions: [float(len(c)) for c in completions]),
        advantage_estimator="gae",
        sampling={"max_new_tokens": 3},
        ppo_epochs=2,
        num_mini_batches=2,
    )
    fit(module, hh_pairs(hh_dir), [reset], max_steps=8)
    assert reset.steps == 8 == module.global_step  # 2 rollouts × 2 epochs × 2 minibatches
    assert any(name.startswith("value_head") for name in reset.weights)  # include_value_head


def test_weight_interpolation_and_hma_at_the_end_of_training(hh_dir, tmp_path):
    recorder = Recorder()
    module = dpo(export_dir=str(tmp_path / "export"))
    fit(module, pairs(hh_dir), [recorder, WeightInterpolation(alpha=0.5, block_alphas=[0.2, 0.8])], 2)
    theta0, trained = recorder.initial, recorder.after[-1]
    expected = {}
    for name in theta0:
        ratio = {0: 0.2, 1: 0.8}.get(layer_index(name), 0.5)
        expected[name] = (1 - ratio) * theta0[name] + ratio * trained[name]
    for name, parameter in module.policy.named_parameters():
        assert torch.allclose(parameter, expected[name], atol=1e-6), name
    from transformers import AutoModelForCausalLM

    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "export").named_parameters())
    assert torch.allclose(exported["model.layers.0.mlp.up_proj.weight"], expected["model.layers.0.mlp.up_proj.weight"])


def test_interpolation_sweep_logs_one_validation_point_per_alpha(hh_dir):
    sweep = WeightInterpolation(alpha=1.0, sweep=[0.0, 1.0])
    module = dpo()
    trainer = fit(module, pairs(hh_dir), [sweep], max_steps=2, limit_val_batches=1)
    assert [point["interpolation/alpha"] for point in sweep.results] == [0.0, 1.0]
    at_init, trained = sweep.results
    # α = 0 is the initial policy, identical to the reference: DPO's implicit rewards are exactly zero
    assert at_init["eval_rewards/chosen"] == 0.0 and at_init["eval_rewards/margins"] == 0.0
    assert trained["eval_rewards/chosen"] != 0.0
    # the final weights are alpha = 1: validating them again reproduces the α = 1 point
    trainer.validate(module, datamodule=pairs(hh_dir), verbose=False)
    assert float(trainer.callback_metrics["eval_rewards/margins"]) == pytest.approx(trained["eval_rewards/margins"])


def save_tiny(directory, seed: int, **overrides) -> str:
    tiny_llama(seed, **overrides).save_pretrained(directory)
    load_tokenizer("tiny-llama").save_pretrained(directory)
    return str(directory)


def test_reference_soup_averages_checkpoints(hh_dir, tmp_path):
    first, second = save_tiny(tmp_path / "a", seed=1), save_tiny(tmp_path / "b", seed=2)
    recorder = Recorder()
    module = dpo()
    fit(module, pairs(hh_dir), [ReferenceSoup([first, second], weights=[0.25, 0.75], init_policy=True), recorder], 1)
    a, b = dict(tiny_llama(1).named_parameters()), dict(tiny_llama(2).named_parameters())
    for name, reference in module.reference.named_parameters():
        assert torch.allclose(reference, 0.25 * a[name] + 0.75 * b[name], atol=1e-6), name
        assert torch.allclose(recorder.initial[name], reference, atol=1e-6), name  # init_policy: the policy too


def test_lit_align_soup_writes_the_weighted_average_as_a_model_directory(tmp_path, capsys):
    first, second = save_tiny(tmp_path / "a", seed=1), save_tiny(tmp_path / "b", seed=2)
    cli_main(["soup", first, second, "--weights", "0.25", "0.75", "--out", str(tmp_path / "soup")])
    assert "wrote" in capsys.readouterr().out
    soup = AutoModelForCausalLM.from_pretrained(tmp_path / "soup")
    a, b = dict(tiny_llama(1).named_parameters()), dict(tiny_llama(2).named_parameters())
    for name, tensor in soup.named_parameters():
        assert torch.allclose(tensor, 0.25 * a[name] + 0.75 * b[name], atol=1e-6), name
    assert len(AutoTokenizer.from_pretrained(tmp_path / "soup")) == len(load_tokenizer("tiny-llama"))
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["weights"] == [0.25, 0.75]
    with pytest.raises(ValueError, match="sum to 1"):
        cli_main(["soup", first, second, "--weights", "0.5", "0.6", "--out", str(tmp_path / "bad")])


def test_reference_soup_from_lightning_checkpoints_and_incompatible_shapes(hh_dir, tmp_path):
    module = dpo()
    trainer = fit(module, pairs(hh_dir), [], max_steps=1)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    soup = ReferenceSoup([str(tmp_path / "trained.ckpt")])
    fresh = dpo()
    fit(fresh, pairs(hh_dir), [soup], max_steps=1)
    trained = dict(module.policy.named_parameters())
    for name, reference in fresh.reference.named_parameters():
        assert torch.equal(reference, trained[name]), name

    wide = save_tiny(tmp_path / "wide", seed=1, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' is \(96, 64\)"):
        fit(dpo(), pairs(hh_dir), [ReferenceSoup([wide])], max_steps=1)


def rank_by_magnitude(values: torch.Tensor) -> torch.Tensor:
    """0 for the largest |value|; equal magnitudes ranked by position."""
    order = values.abs().flatten().argsort(descending=True, stable=True)
    return order.argsort().view_as(values)


@pytest.mark.parametrize("method", ["ondare", "onties"])
def test_online_merging_replaces_each_update_by_the_merge(hh_dir, tmp_path, method):
    base = save_tiny(tmp_path / "base", seed=5)
    alpha, keep, seed = 0.3, 0.5, 7
    recorder = Recorder()
    module = dpo()
    merging = OnlineMerging(base_model=base, method=method, alpha=alpha, keep=keep, seed=seed)
    fit(module, pairs(hh_dir), [recorder, merging], max_steps=2)
    base_weights = dict(tiny_llama(5).named_parameters())
    generator = torch.Generator().manual_seed(seed)  # the masks, drawn independently in the same order
    for step in range(2):
        after_merge = recorder.before[step + 1] if step == 0 else snapshot(module.policy)
        for name in after_merge:
            before, raw = recorder.before[step][name], recorder.after[step][name]
            delta, tau = raw - before, recorder.initial[name] - base_weights[name]
            if method == "ondare":
                keep_tau = torch.rand(tau.shape, generator=generator) < keep
                keep_delta = torch.rand(tau.shape, generator=generator) < keep
                # kept entries rescaled by 1/p (the default, as the released code's F.dropout)
                expected = before + ((1 - alpha) * delta * keep_delta + alpha * tau * keep_tau) / keep
            else:
                k = round(keep * tau.numel())
                trimmed_tau = tau * (rank_by_magnitude(tau) < k)
                kept_delta = delta * (rank_by_magnitude(delta) < k)
                a, b = (1 - alpha) * kept_delta, alpha * trimmed_tau
                expected = before + torch.where(a * b >= 0, a + b, torch.where(a.abs() >= b.abs(), a, b))
            assert torch.allclose(after_merge[name], expected, atol=1e-6), (step, name)
    assert merging.tau.numel() == sum(p.numel() for p in module.policy.parameters())  # τ only: one copy


def test_reference_sync_soft_update_with_kto(hh_dir):
    recorder = Recorder()
    module = KTOModule(model="tiny-llama", learning_rate=1e-2, lr_scheduler="constant")
    fit(module, pairs(hh_dir, batch_size=4), [recorder, ReferenceSync(alpha=0.6, sync_every=2)], max_steps=3)
    for name, reference in module.reference.named_parameters():
        # synced once, after step 2: 0.6·θ_2 + 0.4·θ_0
        assert torch.allclose(reference, 0.6 * recorder.after[1][name] + 0.4 * recorder.initial[name], atol=1e-6)


def test_callbacks_that_write_the_reference_refuse_lora_and_precomputed_log_probs(hh_dir):
    with pytest.raises(ValueError, match="LoRA"):
        lora = DPOModule(model="tiny-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
        fit(lora, pairs(hh_dir), [ReferenceSync()], max_steps=1)
    with pytest.raises(ValueError, match="precompute_ref_logps"):
        fit(dpo(precompute_ref_logps=True), pairs(hh_dir), [ElasticReset(2, ema_as_reference=True)], max_steps=1)


# ---- resume -----------------------------------------------------------------------------------------------------


RESUMABLE = {
    "elastic_reset": lambda tmp: ElasticReset(reset_every=3, decay=0.5),
    "interpolation": lambda tmp: WeightInterpolation(alpha=0.5),
    "reference_soup": lambda tmp: ReferenceSoup([save_tiny(tmp / "a", 1), save_tiny(tmp / "b", 2)]),
    "online_merging": lambda tmp: OnlineMerging(base_model=save_tiny(tmp / "base", 5), alpha=0.3, keep=0.5),
    "reference_sync": lambda tmp: ReferenceSync(alpha=0.5, sync_every=3),
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_a_run_resumed_from_step_2_ends_with_the_weights_of_an_uninterrupted_run(hh_dir, tmp_path, name):
    make = RESUMABLE[name]
    torch.manual_seed(0)
    uninterrupted = dpo()
    fit(uninterrupted, pairs(hh_dir), [make(tmp_path)], max_steps=4)

    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(dpo(), pairs(hh_dir), [make(tmp_path), checkpoints], max_steps=2)
    torch.manual_seed(123)  # nothing after the resume may depend on the global RNG
    resumed = dpo()
    checkpoint = str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    fit(resumed, pairs(hh_dir), [make(tmp_path)], max_steps=4, ckpt_path=checkpoint)

    expected = uninterrupted.state_dict()
    got = resumed.state_dict()
    assert set(got) == set(expected)
    assert any(key.startswith(("policy.", "callback_weights.")) for key in got)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
