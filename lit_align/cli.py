"""The ``lit-align`` command: LightningCLI in subclass mode.

lit-align fit --config configs/hh/dpo.yaml [--data.data_path ...] [--trainer.max_steps ...]
lit-align fit --model lit_align.DPOModule --print_config
lit-align export --ckpt_path outputs/hh_dpo/version_0/checkpoints/last.ckpt --export_dir outputs/dpo-policy
lit-align sweep configs/experiments/<sweep>.yaml --out outputs/<sweep> [--parallel N] (lit_align/sweep.py)
lit-align evaluate --policies outputs/a/policy outputs/b/policy --reference smollm2-135m-instruct ... (evaluate.py)
lit-align soup outputs/sft_a/policy outputs/sft_b/policy --out outputs/soup (callbacks/reference_soup.py)

Every subcommand starts from the trainer defaults in configs/trainer/default.yaml (LightningCLI
``default_config_files``); --config files and --trainer.* flags given on the command line override them key by key.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.base import BenchmarkDataModule
from datamodules.readers import DataValidationError
from lit_align.base import AlignmentModule
from lit_align.precision import AUTO, fastest_precision

# configs/ sits next to the package in the repository (lit-align is installed editable, `pip install -e .`)
TRAINER_DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "configs" / "trainer" / "default.yaml"

# The same values as TRAINER_DEFAULTS_FILE, applied only when that file is missing (an install without configs/);
# tests/test_cli.py checks that the two agree.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "outputs"}},
}


class CLIError(ValueError):
    """A command line the CLI refuses before training (printed as ``lit-align: error: ...``, exit status 2)."""


class CheckpointPathError(CLIError):
    """``--ckpt_path`` names no file, a checkpoint of another module class, or a file that is not a checkpoint."""


class AlignTrainer(Trainer):
    """Lightning's ``Trainer`` with one more ``precision`` value, ``"auto"``: bf16 mixed precision where the
    hardware multiplies bf16 natively, else fp32 (``lit_align.precision.fastest_precision``). Every other argument
    is Lightning's."""

    def __init__(
        self,
        *args: Any,
        accelerator: str | Accelerator = "auto",
        precision: _PRECISION_INPUT | Literal["auto"] | None = None,
        **kwargs: Any,
    ) -> None:
        if precision == AUTO:
            precision = fastest_precision(accelerator if isinstance(accelerator, str) else "auto")
            rank_zero_info(f"precision auto: {precision} on this machine")
        super().__init__(*args, accelerator=accelerator, precision=precision, **kwargs)


class AlignCLI(LightningCLI):
    """LightningCLI with the shared trainer defaults, ``--trainer.precision auto`` (``AlignTrainer``), a
    ``ModelCheckpoint`` that keeps ``last.ckpt`` (options under ``--checkpoint.*``; off with
    ``--trainer.enable_checkpointing false``), and a ``--ckpt_path`` that never overrides the command line
    (``_parse_ckpt_path``)."""

    def __init__(self, *args: Any, trainer_class: type[Trainer] = AlignTrainer, **kwargs: Any) -> None:
        super().__init__(*args, trainer_class=trainer_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if not TRAINER_DEFAULTS_FILE.is_file():
            parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_DEFAULTS.items()})
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt as a link to the newest checkpoint: never behind it, no second copy on disk
        parser.set_defaults({"checkpoint.save_last": "link"})

    def before_instantiate_classes(self) -> None:
        """One gradient-accumulation knob for every module: ``--trainer.accumulate_grad_batches N`` becomes
        ``gradient_accumulation_steps`` of the modules that step their optimizer themselves (PPO, GRPO: Lightning
        refuses accumulation under manual optimization)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None or not isinstance(config.get("model"), Namespace):
            return
        accumulate = (config.get("trainer") or Namespace()).get("accumulate_grad_batches") or 1
        class_path = config.model.get("class_path") or ""
        if accumulate == 1 or not class_path.endswith(("PPOModule", "GRPOModule")):
            return
        given = config.model.init_args.get("gradient_accumulation_steps", 1)
        if given not in (1, accumulate):
            raise CLIError(
                f"--trainer.accumulate_grad_batches {accumulate} and --model.init_args.gradient_accumulation_steps "
                f"{given} disagree; set one"
            )
        config.model.init_args.gradient_accumulation_steps = accumulate
        config.trainer.accumulate_grad_batches = 1
        rank_zero_info(f"{class_path}: accumulating gradients over {accumulate} micro-batches per minibatch step")

    def after_instantiate_classes(self) -> None:
        """Put the config of the module's object arguments (``object_arguments``: a reward, a target; left out of
        its hyperparameters) back into them, so this run's checkpoints rebuild those objects on their own."""
        if not isinstance(self.model, AlignmentModule) or not self.model.object_arguments:
            return
        self._dump_config()  # LightningCLI's own plain-data dump of this subcommand's config (its instantiator's too)
        given = (self.config_dump.get("model") or {}).get("init_args") or {}
        for name in self.model.object_arguments:
            if name in given:
                self.model.hparams[name] = given[name]

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Drop the ``--checkpoint`` callback when checkpointing is off or the config lists a ModelCheckpoint."""
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        listed = trainer_config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if trainer_config.get("enable_checkpointing") is False or any(isinstance(c, ModelCheckpoint) for c in listed):
            extra = [callback for callback in extra if not isinstance(callback, ModelCheckpoint)]
        return self._instantiate_trainer(trainer_config, extra)

    def after_fit(self) -> None:
        """Exit codes a scheduler understands: 128 + the signal number after a SIGINT/SIGTERM stop (with its
        checkpoint), 1 after a fit that made no optimizer step (nothing exported)."""
        signum = getattr(self.model, "stopped_by_signal", None)
        if signum:
            sys.exit(128 + signum)
        if getattr(self.model, "made_no_step", False):
            sys.exit(1)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` to the newest ``last.ckpt`` of this run's logger directory, and keep the
        command line's settings: LightningCLI would replace them with the checkpoint's hyperparameters (a resumed
        run with a new ``export_dir`` would export to the old one). Differences are listed in a warning; a checkpoint
        of another module class, or a file that is not a readable checkpoint, is an error."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        if ckpt_path == "last":
            ckpt_path = config["ckpt_path"] = str(find_last_checkpoint(config))
            rank_zero_info(f"--ckpt_path last: resuming from {ckpt_path}")
        path = Path(ckpt_path)
        if not path.is_file():
            raise CheckpointPathError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        hparams = dict(read_checkpoint(path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        saved_class = hparams.pop("_class_path", None)
        given = config.get("model")
        if not isinstance(given, Namespace) or "class_path" not in given:
            return
        if saved_class is not None and saved_class != given.class_path:
            raise CheckpointPathError(
                f"--ckpt_path {ckpt_path} is a {saved_class} checkpoint; the command line trains {given.class_path}"
            )
        differences = hyperparameter_differences(hparams, given.get("init_args") or Namespace())
        if differences:
            rank_zero_warn(
                f"--ckpt_path {ckpt_path}: the command line's settings are used, not the checkpoint's, where they "
                "differ:\n  " + "\n  ".join(differences)
            )


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path`` (memory-mapped: tensors are not read), or an error naming the file."""
    if not path.is_file():
        raise CheckpointPathError(f"--ckpt_path {path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated zip, a pickle of other objects, not a torch file at all
        raise CheckpointPathError(
            f"--ckpt_path {path}: not a readable checkpoint (truncated or not a Lightning checkpoint): {err}"
        ) from err


def hyperparameter_differences(saved: dict, given: Namespace) -> list[str]:
    """``model.init_args.<name>: checkpoint <value> → command line <value>`` for each setting that differs."""
    given = given.as_dict() if isinstance(given, Namespace) else dict(given)
    missing = "<not set>"
    return [
        f"model.init_args.{name}: checkpoint {saved.get(name, missing)!r} → command line {given.get(name, missing)!r}"
        for name in sorted(set(saved) | set(given))
        if _plain(saved.get(name, missing)) != _plain(given.get(name, missing))
    ]


def _plain(value: Any) -> Any:
    """Compare config values by content: namespaces and dicts as dicts, tuples as lists."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def find_last_checkpoint(config: Namespace) -> Path:
    """The newest ``last*.ckpt`` where this run's checkpoints go: ``--checkpoint.dirpath``, else every version of
    the logger's directory (``<save_dir>/<name>/version_*/checkpoints``; a new run gets a new version) or
    ``<default_root_dir>/checkpoints``."""
    places: list[tuple[Path, str]] = []  # (directory, the pattern below it that holds checkpoints)
    dirpath = (config.get("checkpoint") or Namespace()).get("dirpath")
    if dirpath:
        places.append((Path(dirpath), ""))
    else:
        trainer = config.get("trainer") or Namespace()
        root = Path(trainer.get("default_root_dir") or ".")
        loggers = trainer.get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        for logger in loggers:
            if isinstance(logger, Namespace):
                args = logger.get("init_args") or Namespace()
                save_dir = Path(args.get("save_dir") or root)
                places.append((save_dir / (args.get("name") or "lightning_logs"), "version_*/checkpoints"))
            elif logger is not False and logger is not None:
                places.append((root / "lightning_logs", "version_*/checkpoints"))
        places.append((root / "checkpoints", ""))
    found = [path for base, below in places for path in base.glob(str(Path(below, "last*.ckpt")))]
    if not found:
        searched = ", ".join(str(base / below) for base, below in places)
        raise CheckpointPathError(f"--ckpt_path last: no last.ckpt in {searched}; give the path")
    return max(found, key=lambda path: path.stat().st_mtime)


def export_command(args: list[str]) -> None:
    """``lit-align export --ckpt_path CKPT --export_dir DIR [--merge false]``: a checkpoint → a Hugging Face
    directory (with its model card); under LoRA ``--merge false`` writes a peft adapter directory."""
    import argparse

    from lit_align.export import export_checkpoint

    parser = argparse.ArgumentParser(prog="lit-align export", description=export_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by a lit-align fit")
    parser.add_argument("--export_dir", required=True, help="the directory to write")
    parser.add_argument("--merge", type=lambda text: text.lower() not in ("false", "0", "no"), default=True)
    options = parser.parse_args(args)
    read_checkpoint(Path(options.ckpt_path))  # a missing or unreadable file: a message naming it
    export_checkpoint(options.ckpt_path, options.export_dir, merge=options.merge)


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `python -m lit_align.cli` can import a reward function or class from a file in the working directory
    # (`reward_funcs: [my_rewards.accuracy]`); the `lit-align` script alone could not. Appended, not prepended: a file
    # there never shadows an installed package.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    words = sys.argv[1:] if args is None else args
    defaults = [str(TRAINER_DEFAULTS_FILE)] if TRAINER_DEFAULTS_FILE.is_file() else []
    try:
        if words[:1] == ["export"]:
            export_command(words[1:])
        elif words[:1] == ["sweep"]:
            from lit_align.sweep import main as sweep_main

            sweep_main(words[1:])
        elif words[:1] == ["evaluate"]:
            from lit_align.evaluate import main as evaluate_main

            evaluate_main(words[1:])
        elif words[:1] == ["soup"]:
            from callbacks.reference_soup import main as soup_main

            soup_main(words[1:])
        else:
            run_cli(defaults, args)
    except (CLIError, DataValidationError) as err:  # bad options or data: the message names them; no traceback
        print(f"lit-align: error: {err}", file=sys.stderr)
        sys.exit(2)


def run_cli(defaults: list[str], args: list[str] | None) -> AlignCLI:
    """Run ``lit-align`` with the trainer defaults ``defaults``; returns the CLI (its trainer, model, datamodule)."""
    return AlignCLI(
        AlignmentModule,
        BenchmarkDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={command: {"default_config_files": defaults} for command in LightningCLI.subcommands()},
        args=args,
    )


if __name__ == "__main__":
    main()
