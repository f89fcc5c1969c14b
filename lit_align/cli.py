"""The ``lit-align`` command: LightningCLI in subclass mode.

lit-align fit --config configs/hh/dpo.yaml [--data.data_path ...] [--trainer.max_steps ...]
lit-align fit --model lit_align.DPOModule --print_config

Every subcommand starts from the trainer defaults in configs/trainer/default.yaml (LightningCLI
``default_config_files``); --config files and --trainer.* flags given on the command line override them key by key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.base import BenchmarkDataModule
from lit_align.base import AlignmentModule

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


class AlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if not TRAINER_DEFAULTS_FILE.is_file():
            parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_DEFAULTS.items()})


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    defaults = [str(TRAINER_DEFAULTS_FILE)] if TRAINER_DEFAULTS_FILE.is_file() else []
    AlignCLI(
        AlignmentModule,
        BenchmarkDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={command: {"default_config_files": defaults} for command in LightningCLI.subcommands()},
        args=args,
    )


if __name__ == "__main__":
    main()
