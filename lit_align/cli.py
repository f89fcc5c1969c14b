"""The ``lit-align`` command: LightningCLI in subclass mode.

lit-align fit --config configs/hh/dpo.yaml [--data.data_path ...] [--trainer.max_steps ...]
lit-align fit --model lit_align.DPOModule --print_config
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from datamodules.base import BenchmarkDataModule
from lit_align.base import AlignmentModule


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    LightningCLI(
        AlignmentModule,
        BenchmarkDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
