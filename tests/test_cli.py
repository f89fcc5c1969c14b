"""The `lit-align` console script end to end (subprocess), on the shipped configs with a tiny model."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    c for c in (REPO / "configs").glob("*/*.yaml") if c.parent.name not in ("strategies", "trainer", "experiments")
)  # experiments/ holds sweep and evaluate files: tests/test_sweep.py
STRATEGIES = sorted((REPO / "configs" / "strategies").glob("*.yaml"))
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


# The effective trainer settings of every shipped benchmark config that differ from Lightning's own Trainer
# defaults, pinned as they were when the shared ones moved into configs/trainer/default.yaml (devices 1, 32-true,
# CSVLogger in outputs/; accelerator auto is Lightning's default too): (settings, logger name, callback classes).
def _online(max_steps: int, val_check_interval: int, num_sanity_val_steps: int, **more) -> dict:
    return {
        "max_steps": max_steps,
        "val_check_interval": val_check_interval,
        "num_sanity_val_steps": num_sanity_val_steps,
        "log_every_n_steps": 1,
        **more,
    }


SHARED = {"devices": 1, "precision": "32-true"}
OFFLINE = {"max_epochs": 1, "gradient_clip_val": 1.0, "log_every_n_steps": 4, "num_sanity_val_steps": 0}
IMDB = _online(24, 12, 2, limit_val_batches=2)
EXPECTED_TRAINER = {
    "controlled/amazing_dpg.yaml": (_online(30, 30, -1), "controlled_amazing_dpg", []),
    "controlled/amazing_gdcpp.yaml": (_online(30, 30, -1), "controlled_amazing_gdcpp", []),
    "controlled/amazing_ppo.yaml": (_online(120, 30, -1), "controlled_amazing_ppo", []),
    "controlled/female_biographies.yaml": (_online(30, 30, -1), "controlled_female_biographies", []),
    "controlled/positive_sentiment.yaml": (_online(30, 30, -1), "controlled_positive_sentiment", []),
    "controlled/science_wordlist.yaml": (_online(30, 30, -1), "controlled_science_wordlist", []),
    "hh/dpo.yaml": ({**OFFLINE, "precision": "auto"}, "hh_dpo", []),
    "hh/dpo_online_merging.yaml": (OFFLINE, "hh_dpo_online_merging", ["callbacks.OnlineMerging"]),
    "hh/dpo_reference_soup.yaml": (OFFLINE, "hh_dpo_reference_soup", ["callbacks.ReferenceSoup"]),
    "hh/ipo.yaml": (OFFLINE, "hh_ipo", []),
    "hh/kto.yaml": (OFFLINE, "hh_kto", []),
    "hh/reward_model.yaml": (OFFLINE, "hh_reward_model", []),
    "hh/sft.yaml": (OFFLINE, "hh_sft", []),
    "imdb/grpo.yaml": ({**IMDB, "precision": "auto"}, "imdb_grpo", []),
    "imdb/ppo.yaml": ({**IMDB, "precision": "auto"}, "imdb_ppo", ["callbacks.RewardDriftPlot"]),
    "imdb/ppo_elastic_reset.yaml": (IMDB, "imdb_ppo_elastic_reset", ["callbacks.ElasticReset"]),
    "imdb/ppo_interpolation_sweep.yaml": (IMDB, "imdb_ppo_interpolation", ["callbacks.WeightInterpolation"]),
    "multi30k/ppo_pivot.yaml": (_online(8, 8, -1), "multi30k_pivot", []),
    "tldr/dpo.yaml": (OFFLINE, "tldr_dpo", []),
    "ultrafeedback/dpo.yaml": (OFFLINE, "ultrafeedback_dpo", []),
}


def lightning_trainer_defaults() -> dict:
    import inspect

    from lightning.pytorch import Trainer

    return {name: p.default for name, p in inspect.signature(Trainer.__init__).parameters.items() if name != "self"}


def assert_trainer_settings(trainer: dict, config: str) -> None:
    """``trainer`` (a printed config's section) holds exactly the pinned non-default settings of ``config``."""
    settings, logger_name, callbacks = EXPECTED_TRAINER[config]
    defaults = lightning_trainer_defaults()
    changed = {k: v for k, v in trainer.items() if k not in ("logger", "callbacks") and v != defaults[k]}
    assert changed == {**SHARED, **settings}, config
    assert trainer["accelerator"] == "auto" and trainer["strategy"] == "auto", config
    logger = trainer["logger"]
    assert (logger["class_path"], logger["init_args"]["save_dir"], logger["init_args"]["name"]) == (
        CSV_LOGGER,
        "outputs",
        logger_name,
    ), config
    assert [c["class_path"] for c in trainer["callbacks"] or []] == callbacks, config


def print_config(*args: str, cwd: Path) -> dict:
    """``lit-align fit ARGS --print_config`` in this process, from ``cwd`` (each test runs in its tmp_path): parsing
    only. The console script itself runs end to end in the fit tests; a subprocess per config cost ~10 s each."""
    from lit_align import cli

    with (
        mock.patch.object(sys, "argv", ["lit-align"]),  # pytest's own arguments are not the CLI's
        contextlib.redirect_stdout(io.StringIO()) as out,
        pytest.raises(SystemExit) as exit_,
    ):
        cli.main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None), out.getvalue()[-3000:]
    return yaml.safe_load(out.getvalue())


def lit_align(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(["lit-align", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def tiny_overrides(hh_dir: Path, out: Path) -> list[str]:
    return [
        "--model.init_args.model", "tiny-llama",
        "--data.init_args.data_path", str(hh_dir),
        "--data.init_args.train_split", "test",
        "--data.init_args.val_split", "null",
        "--data.init_args.holdout", "8",
        "--data.init_args.limit_train", "8",
        "--data.init_args.max_length", "48",
        "--data.init_args.max_prompt_length", "32",
        "--trainer.max_steps", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out),
    ]  # fmt: skip


@pytest.mark.parametrize("config", ["hh/dpo.yaml", "hh/kto.yaml"])
def test_fit_two_steps_from_a_shipped_config(tmp_path, hh_dir, config):
    result = lit_align(
        "fit", "--config", str(REPO / "configs" / config), *tiny_overrides(hh_dir, tmp_path), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    header = metrics.splitlines()[0].split(",")
    assert {"eval_rewards/chosen", "rewards/chosen", "grad_norm", "learning_rate"} <= set(header)
    assert not any(name.endswith(("_step", "_epoch")) for name in header)  # TRL's names, no Lightning suffixes
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["model"]["init_args"]["model"] == "tiny-llama"


def test_validate_and_print_config(tmp_path, hh_dir):
    args = ["--config", str(REPO / "configs/hh/sft.yaml"), *tiny_overrides(hh_dir, tmp_path)]
    result = lit_align("validate", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = lit_align("fit", *args, "--print_config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr[-3000:]
    config = yaml.safe_load(printed.stdout)
    assert config["model"]["class_path"] == "lit_align.SFTModule"
    assert config["model"]["init_args"]["completion_only_loss"] is True
    assert config["data"]["init_args"]["holdout"] == 8


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_every_shipped_config_parses(tmp_path, config):
    parsed = print_config("--config", str(config), cwd=tmp_path)
    assert parsed["model"]["class_path"].startswith("lit_align.")
    assert parsed["data"]["class_path"].startswith("datamodules.")
    # the trainer defaults (configs/trainer/default.yaml) merged with the config's own trainer settings
    assert_trainer_settings(parsed["trainer"], str(config.relative_to(REPO / "configs")))
    for key, value in yaml.safe_load(config.read_text())["trainer"].items():
        if key not in ("logger", "callbacks"):
            assert parsed["trainer"][key] == value, (key, "a config's own trainer setting must win")


def test_every_shipped_config_is_pinned():
    assert sorted(EXPECTED_TRAINER) == [str(c.relative_to(REPO / "configs")) for c in CONFIGS]


def test_trainer_defaults_file_and_its_fallback_agree():
    from lit_align import cli

    assert cli.TRAINER_DEFAULTS_FILE == REPO / "configs" / "trainer" / "default.yaml"
    assert yaml.safe_load(cli.TRAINER_DEFAULTS_FILE.read_text()) == {"trainer": cli.TRAINER_DEFAULTS}
    assert cli.TRAINER_DEFAULTS == {
        "accelerator": "auto",
        "devices": 1,
        "precision": "32-true",
        "logger": {"class_path": CSV_LOGGER, "init_args": {"save_dir": "outputs"}},
    }


@pytest.mark.parametrize("defaults_file", ["shipped", "missing"])
def test_config_and_command_line_trainer_settings_win_over_the_defaults(tmp_path, monkeypatch, capsys, defaults_file):
    """In process, with configs/trainer/default.yaml and (an install without configs/) with the in-code fallback."""
    from lit_align import cli

    monkeypatch.setattr(sys, "argv", ["lit-align"])  # pytest's own arguments are not the CLI's
    if defaults_file == "missing":
        monkeypatch.setattr(cli, "TRAINER_DEFAULTS_FILE", tmp_path / "no_such_default.yaml")

    def printed(*args: str) -> dict:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["fit", *args, "--print_config"])
        assert exit_.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)

    benchmark = REPO / "configs/hh/dpo.yaml"
    assert_trainer_settings(printed("--config", str(benchmark))["trainer"], "hh/dpo.yaml")
    # a config's explicit values win, key by key; the logger keeps save_dir when only its name is given
    override = tmp_path / "override.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "precision": "bf16-mixed",
                    "devices": 2,
                    "logger": {"class_path": CSV_LOGGER, "init_args": {"name": "mine"}},
                }
            }
        )
    )
    trainer = printed("--config", str(benchmark), "--config", str(override), "--trainer.max_steps", "7")["trainer"]
    assert (trainer["precision"], trainer["devices"], trainer["accelerator"]) == ("bf16-mixed", 2, "auto")
    assert (trainer["max_steps"], trainer["max_epochs"], trainer["gradient_clip_val"]) == (7, 1, 1.0)
    assert trainer["logger"]["init_args"]["save_dir"] == "outputs"
    assert trainer["logger"]["init_args"]["name"] == "mine"
    trainer = printed("--config", str(benchmark), "--trainer.precision", "16-true", "--trainer.logger", "false")
    assert (trainer["trainer"]["precision"], trainer["trainer"]["logger"]) == ("16-true", False)
    # without any --config, the defaults alone
    trainer = printed("--model", "lit_align.DPOModule", "--data", "datamodules.HHDataModule")["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("auto", 1, "32-true")
    assert trainer["logger"]["init_args"]["save_dir"] == "outputs"


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[c.stem for c in STRATEGIES])
def test_strategy_configs_stack_onto_a_benchmark_config(tmp_path, strategy):
    benchmark = REPO / "configs/hh/dpo.yaml"
    parsed = print_config("--config", str(benchmark), "--config", str(strategy), cwd=tmp_path)
    expected = yaml.safe_load(strategy.read_text())["trainer"]
    assert parsed["trainer"]["strategy"]["class_path"] == expected["strategy"]["class_path"]
    assert parsed["trainer"]["precision"] == "bf16-mixed"
    assert (parsed["trainer"]["accelerator"], parsed["trainer"]["devices"]) == ("gpu", "auto")
    assert parsed["trainer"]["max_epochs"] == 1 and parsed["trainer"]["logger"]["init_args"]["name"] == "hh_dpo"
    assert parsed["model"] == print_config("--config", str(benchmark), cwd=tmp_path)["model"]


def test_fsdp1_config_wraps_exactly_the_decoder_layers(tmp_path, monkeypatch):
    """configs/strategies/fsdp.yaml's auto_wrap_policy, instantiated as the CLI does, under real FSDP1 (1 process)."""
    import torch
    import torch.distributed as dist
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lit_align import DPOModule

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    config = yaml.safe_load((REPO / "configs/strategies/fsdp.yaml").read_text())["trainer"]["strategy"]
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config})).strategy
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    module = DPOModule(model="tiny-llama")
    module.configure_model()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29591")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        # the keyword arguments Lightning's FSDPStrategy passes (auto_wrap_policy, use_orig_params=True)
        wrapped = FullyShardedDataParallel(module, device_id=torch.device("cpu"), **strategy.kwargs)
        units = [type(m.module).__name__ for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)]
    finally:
        dist.destroy_process_group()
    assert policy.layer_classes == {"LlamaDecoderLayer"}  # found in the model's _no_split_modules
    # the root, then the 2 layers of the policy and the 2 of the frozen reference
    assert units == ["DPOModule"] + ["LlamaDecoderLayer"] * 4


def test_unknown_option_is_a_clear_error(tmp_path):
    result = lit_align(
        "fit", "--config", str(REPO / "configs/hh/dpo.yaml"), "--model.init_args.betta", "0.1", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "betta" in result.stderr


def test_callback_configs_train_from_the_cli(tmp_path, hh_dir):
    """The shipped online-merging and reference-soup configs, pointed at tiny models, train and log."""
    from lit_align.models import load_tokenizer, tiny_llama

    models = {}
    for name, seed in (("base", 5), ("soup_a", 1), ("soup_b", 2)):
        tiny_llama(seed).save_pretrained(tmp_path / name)
        load_tokenizer("tiny-llama").save_pretrained(tmp_path / name)
        models[name] = str(tmp_path / name)
    settings = {
        "hh/dpo_online_merging.yaml": {"base_model": models["base"], "alpha": 0.1, "keep": 0.5},
        "hh/dpo_reference_soup.yaml": {"checkpoints": [models["soup_a"], models["soup_b"]]},
    }
    for config, changes in settings.items():
        loaded = yaml.safe_load((REPO / "configs" / config).read_text())
        loaded["trainer"]["callbacks"][0]["init_args"].update(changes)
        path = tmp_path / config.replace("/", "_")
        path.write_text(yaml.safe_dump(loaded))
        result = lit_align("fit", "--config", str(path), *tiny_overrides(hh_dir, tmp_path / path.stem), cwd=tmp_path)
        assert result.returncode == 0, (config, result.stderr[-3000:])
        assert "eval_rewards/chosen" in next((tmp_path / path.stem).rglob("metrics.csv")).read_text()


# ---- checkpoints: --ckpt_path, pre-emption, runs that train nothing ------------------------------------------------


def dpo_args(hh_dir: Path, out: Path, *more: str) -> list[str]:
    """hh/dpo.yaml on the tiny model: 24 training pairs in batches of 8, a checkpoint every step."""
    return [
        "--config", str(REPO / "configs/hh/dpo.yaml"), *tiny_overrides(hh_dir, out),
        "--data.init_args.limit_train", "24", "--checkpoint.every_n_train_steps", "1", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_step_dpo_run(hh_dir, tmp_path_factory) -> Path:
    """A finished 2-step DPO run exported to <dir>/first; its checkpoints under <dir>/logs."""
    run_dir = tmp_path_factory.mktemp("dpo_run")
    args = dpo_args(hh_dir, run_dir / "logs", "--model.init_args.export_dir", str(run_dir / "first"))
    result = lit_align("fit", *args, cwd=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_ckpt_path_last_resumes_with_the_command_lines_settings(hh_dir, two_step_dpo_run):
    run_dir = two_step_dpo_run
    first_export = (run_dir / "first" / "model.safetensors").stat().st_mtime_ns
    resumed = lit_align(
        "fit", *dpo_args(hh_dir, run_dir / "logs", "--trainer.max_steps", "3", "--model.init_args.beta", "0.2"),
        "--model.init_args.learning_rate", "2e-5", "--model.init_args.weight_decay", "0.05",
        "--model.init_args.export_dir", str(run_dir / "second"), "--ckpt_path", "last", cwd=run_dir,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--ckpt_path last: resuming from" in resumed.stderr
    assert "model.init_args.beta: checkpoint 0.1 → command line 0.2" in resumed.stderr
    assert f"model.init_args.export_dir: checkpoint '{run_dir / 'first'}' → command line" in resumed.stderr
    assert (run_dir / "second" / "model.safetensors").is_file()  # the command line's export_dir, not the old one
    assert (run_dir / "first" / "model.safetensors").stat().st_mtime_ns == first_export
    checkpoint = torch.load(newest(run_dir / "logs", "last.ckpt"), weights_only=True, mmap=True)
    assert checkpoint["global_step"] == 3 and checkpoint["hyper_parameters"]["beta"] == 0.2
    # The optimizer and schedule are the command line's too, not the ones Lightning restored from the checkpoint:
    # step 3 of a cosine schedule with 1 warm-up step over 3 steps trains at 2e-5 * (1 + cos(pi/2)) / 2 = 1e-5 (the
    # checkpoint's schedule, 5e-6 over 2 steps, had reached 0).
    assert "resumed with the configured optimizer settings" in resumed.stderr
    rows = list(csv.DictReader(newest(run_dir / "logs", "metrics.csv").open()))
    rates = [float(row["learning_rate"]) for row in rows if row.get("learning_rate")]
    assert rates == [pytest.approx(1e-5, rel=1e-6)], rates
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [2e-5, 2e-5] and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [2e-5, 2e-5]


def newest(directory: Path, name: str) -> Path:
    return max(directory.rglob(name), key=lambda path: path.stat().st_mtime_ns)


def test_bad_ckpt_paths_are_refused_before_training(hh_dir, two_step_dpo_run, tmp_path):
    checkpoint = sorted((two_step_dpo_run / "logs").rglob("epoch=*-step=2.ckpt"))[0]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    kto = ["--config", str(REPO / "configs/hh/kto.yaml"), *tiny_overrides(hh_dir, tmp_path)]
    cases = {
        "a DPO checkpoint for KTO": (
            [*kto, "--ckpt_path", str(checkpoint)],
            f"--ckpt_path {checkpoint} is a lit_align.DPOModule checkpoint; the command line trains "
            "lit_align.KTOModule",
        ),
        "a truncated file": ([*kto, "--ckpt_path", str(truncated)], f"--ckpt_path {truncated}: not a readable"),
        "a missing file": ([*kto, "--ckpt_path", "nope.ckpt"], "--ckpt_path nope.ckpt: no such checkpoint file"),
        "last without a checkpoint": (  # names where it looked, the logger's versions included
            [*kto, "--ckpt_path", "last"],
            f"--ckpt_path last: no last.ckpt in {tmp_path / 'hh_kto' / 'version_*' / 'checkpoints'}, checkpoints;",
        ),
    }
    for case, (args, message) in cases.items():
        result = lit_align("fit", *args, cwd=tmp_path)
        assert result.returncode == 2 and f"lit-align: error: {message}" in result.stderr, (case, result.stderr[-2000:])


def test_a_fit_that_makes_no_optimizer_step_exports_nothing_and_fails(hh_dir, two_step_dpo_run, tmp_path):
    """Resumed at max_steps: no step is made, nothing is exported, the exit status says so."""
    result = lit_align(
        "fit", *dpo_args(hh_dir, two_step_dpo_run / "logs", "--trainer.max_steps", "2"),
        "--model.init_args.export_dir", str(tmp_path / "export"),
        "--ckpt_path", str(sorted((two_step_dpo_run / "logs").rglob("epoch=*-step=2.ckpt"))[0]), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "this fit made no optimizer step" in result.stderr and "Nothing is exported" in result.stderr
    assert not (tmp_path / "export" / "model.safetensors").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_training_with_a_checkpoint_and_an_export(hh_dir, tmp_path, signum):
    args = dpo_args(hh_dir, tmp_path / "logs", "--trainer.max_steps", "1000", "--data.init_args.limit_train", "64")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        ["lit-align", "fit", *args, "--trainer.max_epochs", "100", "--model.init_args.export_dir", "export"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((tmp_path / "logs").rglob("epoch=*.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.5)  # training has made a step
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-3000:]
    last = tmp_path / "logs" / "hh_dpo" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file()  # ours, or ModelCheckpoint's link to its checkpoint of the same step
    step = torch.load(last, weights_only=True, mmap=True)["global_step"]
    assert 1 <= step < 1000 and f"stopped by {signal.Signals(signum).name} at step {step}" in stderr
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_export_validate_and_the_recorded_reference(hh_dir, two_step_dpo_run, tmp_path):
    """`lit-align export` rebuilds the policy of a checkpoint (the fit's own export of the same step), with a model
    card; validating the export compares it with the reference it was trained against, not with itself."""
    from transformers import AutoModelForCausalLM

    checkpoint = sorted((two_step_dpo_run / "logs").rglob("epoch=*-step=2.ckpt"))[0]
    result = lit_align("export", "--ckpt_path", str(checkpoint), "--export_dir", "exported", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    by_fit = AutoModelForCausalLM.from_pretrained(two_step_dpo_run / "first").state_dict()
    assert exported.keys() == by_fit.keys() and all(torch.equal(exported[k], by_fit[k]) for k in exported)
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "`lit_align.DPOModule` from `tiny-llama` for 2 optimizer steps" in card and "Rafailov" in card
    assert f"data_path: `{hh_dir}`" in card
    metadata = json.loads((tmp_path / "exported" / "lit_align.json").read_text())
    assert metadata["reference_model"] == "tiny-llama" and metadata["global_step"] == 2
    assert "| loss | 0.6931 |" in (two_step_dpo_run / "first" / "README.md").read_text()  # the fit's card: metrics

    args = ["--config", str(REPO / "configs/hh/dpo.yaml"), *tiny_overrides(hh_dir, tmp_path / "logs")]
    against_recorded = lit_align("validate", *args, "--model.init_args.model", "exported", cwd=tmp_path)
    assert against_recorded.returncode == 0, against_recorded.stderr[-3000:]
    assert "reference model: tiny-llama (recorded in exported/lit_align.json" in against_recorded.stderr
    assert "against itself" not in against_recorded.stderr
    against_itself = lit_align("validate", *args, cwd=tmp_path)
    assert "evaluating tiny-llama against itself" in against_itself.stderr


def test_predict_writes_completions_with_rewards_and_test_uses_the_test_split(hh_dir, tmp_path):
    """`lit-align predict` samples one completion per prompt with the module's sampling settings and scores it with
    the module's reward; `lit-align test` evaluates `test_split` when one is set."""
    args = [
        "--config", str(REPO / "configs/imdb/ppo.yaml"), *tiny_overrides(hh_dir, tmp_path),
        "--data", "datamodules.HHDataModule", "--data.init_args.data_path", str(hh_dir),
        "--data.init_args.limit_val", "6", "--data.init_args.eval_batch_size", "4",
        "--model.init_args.sampling", "{max_new_tokens: 5}",
    ]  # fmt: skip
    result = lit_align("predict", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in next(tmp_path.rglob("predictions.jsonl")).read_text().splitlines()]
    assert len(rows) == 6 and all(set(row) == {"prompt", "completion", "reward"} for row in rows)  # limit_val
    assert all(isinstance(row["reward"], float) for row in rows) and len({row["prompt"] for row in rows}) > 1

    tested = lit_align(
        "test", "--config", str(REPO / "configs/hh/dpo.yaml"), *tiny_overrides(hh_dir, tmp_path / "t"),
        "--data.init_args.test_split", "test", "--data.init_args.limit_val", "6", cwd=tmp_path,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert re.search(r"HHDataModule: test \(pair, (tokenized|loaded from the tokenized cache)\): 6 rows", tested.stderr)


def test_help_lists_no_optimizer_options_the_modules_ignore(tmp_path):
    """Modules build AdamW and their schedule from their own arguments: LightningCLI's --optimizer/--lr_scheduler
    would be silently ignored, so they are not offered."""
    result = lit_align("fit", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--trainer.max_steps" in result.stdout
    assert "--optimizer" not in result.stdout and "--lr_scheduler" not in result.stdout
    assert "--checkpoint.every_n_train_steps" in result.stdout


def test_trainer_gradient_accumulation_reaches_the_manual_optimization_modules(hh_dir, tmp_path, monkeypatch):
    """`--trainer.accumulate_grad_batches` is the one knob: PPO/GRPO (manual optimization, which Lightning refuses
    to accumulate for) get it as their `gradient_accumulation_steps`."""
    from datamodules.base import BenchmarkDataModule
    from lit_align.base import AlignmentModule
    from lit_align.cli import TRAINER_DEFAULTS_FILE, AlignCLI

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs/imdb/ppo.yaml"), *tiny_overrides(hh_dir, tmp_path)]
    args += ["--data", "datamodules.HHDataModule", "--data.init_args.data_path", str(hh_dir)]
    cli = AlignCLI(
        AlignmentModule, BenchmarkDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        parser_kwargs={"default_config_files": [str(TRAINER_DEFAULTS_FILE)]},
        args=[*args[1:], "--trainer.accumulate_grad_batches", "2"],
    )  # fmt: skip
    assert cli.model.hparams.gradient_accumulation_steps == 2 and cli.trainer.accumulate_grad_batches == 1
