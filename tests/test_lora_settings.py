"""``lora=`` passes peft's LoRA options through: every ``peft.LoraConfig`` field (the common ones typed, the rest in
``extra``), from Python, from a dict and from YAML / the command line, checked on the tiny Llama."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import sys
from unittest import mock

import pytest
import torch
import yaml
from helpers import fit, hh_pairs
from torch import nn

from callbacks import WeightInterpolation
from lit_align import DPOModule
from lit_align.models import LoraSettings, apply_lora, lora_setting_names, tiny_llama


def linear_layers(model: nn.Module) -> set[str]:
    """Names of the model's ``nn.Linear`` layers other than the output layer."""
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"}


def adapted_layers(model: nn.Module) -> set[str]:
    """Names (in the unwrapped model) of the layers that carry a LoRA adapter."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in model.named_modules() if hasattr(module, "lora_A")}


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if hasattr(module, "lora_A")]


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ---- options ---------------------------------------------------------------------------------------------------


def test_all_linear_adapts_every_linear_layer_but_the_output_layer():
    expected = linear_layers(tiny_llama())
    assert len(expected) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    model = apply_lora(tiny_llama(), LoraSettings(r=4, target_modules="all-linear"))
    assert adapted_layers(model) == expected
    assert all("lora_" in name for name in trainable(model))


def test_target_modules_list_and_extra_exclude_modules():
    model = apply_lora(tiny_llama(), LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    assert adapted_layers(model) == {n for n in linear_layers(tiny_llama()) if n.endswith(("q_proj", "v_proj"))}
    model = apply_lora(tiny_llama(), LoraSettings(r=4, extra={"exclude_modules": ["down_proj"]}))
    assert adapted_layers(model) == {n for n in linear_layers(tiny_llama()) if not n.endswith("down_proj")}


def test_dora_adds_a_trainable_magnitude_vector_per_adapted_layer():
    model = apply_lora(tiny_llama(), LoraSettings(r=4, use_dora=True))
    magnitudes = {name: p for name, p in trainable(model).items() if "lora_magnitude_vector" in name}
    assert len(magnitudes) == len(linear_layers(tiny_llama())) == 14
    q_proj = next(p for name, p in magnitudes.items() if "layers.0.self_attn.q_proj" in name)
    assert q_proj.shape == (64,)  # one magnitude per output feature
    assert not any("lora_magnitude_vector" in name for name, _ in apply_lora(tiny_llama(), {"r": 4}).named_parameters())


@pytest.mark.parametrize("use_rslora, scaling", [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_rslora_scales_by_alpha_over_sqrt_r(use_rslora, scaling):
    model = apply_lora(tiny_llama(), LoraSettings(r=4, alpha=8, use_rslora=use_rslora))
    layers = lora_layers(model)
    assert len(layers) == 14
    assert all(layer.scaling["default"] == pytest.approx(scaling) for layer in layers)
    assert scaling == (4.0 if use_rslora else 2.0)


def test_rank_and_alpha_patterns_reach_peft():
    settings = LoraSettings(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 6})
    model = apply_lora(tiny_llama(), settings)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.shape == (2, 64)
    assert q_proj.scaling["default"] == pytest.approx(6 / 2)
    assert model.base_model.model.model.layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(8 / 4)


def test_modules_to_save_trains_lm_head_in_full():
    base = tiny_llama()
    model = apply_lora(tiny_llama(), LoraSettings(r=4, modules_to_save=["lm_head"]))
    names = trainable(model)
    lm_head = [name for name in names if "lm_head" in name]
    assert lm_head and all("modules_to_save" in name for name in lm_head)
    assert names[lm_head[0]].shape == base.lm_head.weight.shape
    assert not any("embed_tokens" in name for name in names)
    assert not any("lm_head" in name for name in trainable(apply_lora(tiny_llama(), LoraSettings(r=4))))


def test_init_lora_weights_gaussian_keeps_b_at_zero():
    model = apply_lora(tiny_llama(), LoraSettings(r=4, init_lora_weights="gaussian"))
    assert all(not layer.lora_B["default"].weight.any() for layer in lora_layers(model))
    assert model.peft_config["default"].init_lora_weights == "gaussian"


# ---- names -----------------------------------------------------------------------------------------------------


def test_alpha_and_dropout_are_short_names_of_the_peft_fields():
    assert LoraSettings(alpha=8, dropout=0.1) == LoraSettings(lora_alpha=8, lora_dropout=0.1)
    settings = LoraSettings(lora_alpha=8)
    assert (settings.alpha, settings.lora_alpha, settings.dropout, settings.lora_dropout) == (8, 8, 0.05, 0.05)
    assert LoraSettings(alpha=8, lora_alpha=8).alpha == 8
    with pytest.raises(ValueError, match=r"lora: alpha=8 and lora_alpha=16 disagree"):
        LoraSettings(alpha=8, lora_alpha=16)
    config = apply_lora(tiny_llama(), LoraSettings(r=4, alpha=12, dropout=0.0)).peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.task_type) == (4, 12, 0.0, "CAUSAL_LM")


def test_valid_names_come_from_peft_lora_config():
    from peft import LoraConfig

    names = lora_setting_names()
    assert names[:4] == ["r", "alpha", "dropout", "target_modules"]
    peft_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert set(names) - {"alpha", "dropout"} <= peft_fields
    assert {"use_dora", "use_rslora", "exclude_modules", "layers_pattern", "lora_bias"} <= set(names)
    assert not {"task_type", "inference_mode", "peft_type", "extra"} & set(names)
    with pytest.raises(ValueError, match=r"^lora: unknown settings \['rank'\]; valid: \['r', 'alpha', .*'use_dora'"):
        apply_lora(tiny_llama(), {"rank": 8})
    with pytest.raises(ValueError, match=r"^lora: unknown settings \['rank'\]; valid: \["):
        LoraSettings(extra={"rank": 8})


def test_task_type_is_the_modules_not_a_setting():
    with pytest.raises(ValueError, match=r"lora: \['task_type'\] cannot be set.*lit-align sets"):
        apply_lora(tiny_llama(), {"r": 4, "task_type": "SEQ_CLS"})
    with pytest.raises(ValueError, match=r"lora: \['inference_mode'\] cannot be set"):
        LoraSettings(extra={"inference_mode": True})
    with pytest.raises(ValueError, match=r"lora: \['use_dora'\] are LoraSettings fields; set them directly"):
        LoraSettings(extra={"use_dora": True})


def test_a_dict_sends_other_lora_config_fields_to_extra():
    settings = LoraSettings.from_dict({"r": 4, "use_dora": True, "exclude_modules": ["down_proj"], "lora_bias": False})
    assert settings.use_dora and settings.extra == {"exclude_modules": ["down_proj"], "lora_bias": False}
    settings = {"r": 4, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": 1, "layers_pattern": "layers"}
    model = apply_lora(tiny_llama(), settings)  # layers_pattern: a LoraConfig field without a LoraSettings field
    assert adapted_layers(model) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_settings_survive_a_weights_only_checkpoint_and_older_pickles(tmp_path):
    settings = LoraSettings(r=4, use_dora=True, rank_pattern={"q_proj": 2}, extra={"exclude_modules": ["o_proj"]})
    torch.save({"lora": settings}, tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["lora"] == settings
    # an instance unpickled from a checkpoint written before the new fields existed: only the four old ones
    old = object.__new__(LoraSettings)
    old.__dict__.update(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    config = apply_lora(tiny_llama(), old).peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_dora) == (4, 8, 0.0, False)


# ---- YAML / command line -----------------------------------------------------------------------------------------


def print_config(*args: str) -> dict:
    """The configuration ``lit-align fit ARGS --print_config`` prints, parsed in this process."""
    from lit_align import cli

    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["lit-align"]), contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None), out.getvalue()[-3000:]
    return yaml.safe_load(out.getvalue())


def test_command_line_lora_settings_reach_peft(tmp_path, monkeypatch):
    from datamodules import BenchmarkDataModule
    from lit_align import cli
    from lit_align.base import AlignmentModule

    monkeypatch.chdir(tmp_path)
    lora = "{r: 4, use_dora: true, target_modules: all-linear}"
    model_args = ["--model", "lit_align.DPOModule", "--model.init_args.model", "tiny-llama"]
    args = [*model_args, "--model.init_args.lora", lora, "--data", "datamodules.HHDataModule"]
    printed = print_config(*args)["model"]["init_args"]["lora"]
    assert printed["r"] == 4 and printed["use_dora"] is True and printed["target_modules"] == "all-linear"

    with mock.patch.object(sys, "argv", ["lit-align"]):
        parsed = cli.AlignCLI(
            AlignmentModule,
            BenchmarkDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            run=False,
            args=[*args, "--trainer.logger", "false", "--trainer.accelerator", "cpu"],
        )
    model = apply_lora(tiny_llama(), parsed.model.hparams.lora)  # what configure_model does with it
    assert adapted_layers(model) == linear_layers(tiny_llama())
    assert any("lora_magnitude_vector" in name for name in trainable(model))
    assert model.peft_config["default"].r == 4


def test_config_file_lora_settings_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "lora.yaml"
    config.write_text(
        "model:\n"
        "  class_path: lit_align.DPOModule\n"
        "  init_args:\n"
        "    model: tiny-llama\n"
        "    lora:\n"
        "      r: 4\n"
        "      lora_alpha: 8\n"
        "      use_rslora: true\n"
        "      modules_to_save: [lm_head]\n"
        "      target_modules: [q_proj, v_proj]\n"
        "      layers_to_transform: [1]\n"
        "      extra: {layers_pattern: layers}\n"
        "data:\n"
        "  class_path: datamodules.HHDataModule\n"
    )
    lora = print_config("--config", str(config))["model"]["init_args"]["lora"]
    assert lora["use_rslora"] is True and lora["modules_to_save"] == ["lm_head"] and lora["layers_to_transform"] == [1]
    assert lora["extra"] == {"layers_pattern": "layers"}
    model = apply_lora(tiny_llama(), lora)
    assert adapted_layers(model) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert all(layer.scaling["default"] == pytest.approx(8 / 2) for layer in lora_layers(model))
    assert any("lm_head" in name for name in trainable(model))


def test_a_bad_yaml_setting_is_refused_by_the_parser(tmp_path, monkeypatch):
    from lit_align import cli

    monkeypatch.chdir(tmp_path)
    args = ["--model", "lit_align.DPOModule", "--model.init_args.lora", "{r: 4, use_dora: maybe}"]
    with mock.patch.object(sys, "argv", ["lit-align"]), contextlib.redirect_stderr(io.StringIO()) as err:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["fit", *args, "--data", "datamodules.HHDataModule", "--print_config"])
    assert exit_.value.code != 0
    assert "use_dora" in err.getvalue()


# ---- training ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dpo_with_all_linear_adapters_trains_one_step(hh_dir, use_dora):
    torch.manual_seed(0)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_dora=use_dora)
    module = DPOModule(model="tiny-llama", lora=settings, learning_rate=1e-2, lr_scheduler="constant")
    trainer = fit(module, hh_pairs(hh_dir, batch_size=2), max_steps=1)
    assert trainer.global_step == 1
    policy = module.policy
    assert adapted_layers(policy) == linear_layers(tiny_llama())
    assert all(layer.lora_B["default"].weight.any() for layer in lora_layers(policy))  # B started at zero
    base = dict(tiny_llama().named_parameters())
    frozen = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): p
        for name, p in policy.named_parameters()
        if not p.requires_grad
    }
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[name], base[name]) for name in base)


def test_weight_interpolation_refuses_dora_at_setup(hh_dir):
    module = DPOModule(model="tiny-llama", lora=LoraSettings(r=4, use_dora=True), learning_rate=1e-2)
    with pytest.raises(ValueError, match=r"WeightInterpolation: the LoRA tensor .*lora_magnitude_vector.*DoRA"):
        fit(module, hh_pairs(hh_dir, batch_size=2), [WeightInterpolation(alpha=0.5)], max_steps=1)
    assert module.trainer.global_step == 0  # refused before the first step
