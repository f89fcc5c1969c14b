"""What the multi-process test scripts share: the rank environment and a strategy by name, on top of the tests'
own helpers (``tests/helpers.py``: the quiet CPU Trainer and the small HH pair data). Scripts are started like
torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR... in the environment), so Lightning joins those processes
instead of launching its own."""

import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
import helpers  # noqa: E402

from datamodules import HHDataModule  # noqa: E402

WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))  # read once: a finished DDP fit may rewrite the environment
RANK_ZERO = int(os.environ.get("RANK", "0")) == 0


def make_strategy(name: str, devices: int):
    """``single`` (one process), ``ddp`` (gloo) or ``fsdp2`` (ModelParallelStrategy, all ranks data parallel)."""
    if devices == 1 or name == "single":
        return "auto"
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    raise ValueError(f"unknown strategy {name!r}")


def quiet_trainer(strategy: str, max_steps: int, callbacks=(), devices: int = WORLD_SIZE, **overrides) -> L.Trainer:
    """``helpers.quiet_trainer`` on ``devices`` processes with the strategy called ``strategy``."""
    by_name = make_strategy(strategy, devices)
    return helpers.quiet_trainer(max_steps, callbacks, devices=devices, strategy=by_name, **overrides)


def hh_pairs(hh_dir: str, global_batch: int = 4, devices: int = WORLD_SIZE, **overrides) -> HHDataModule:
    """``helpers.hh_pairs`` with the same global batch on any number of ranks."""
    return helpers.hh_pairs(hh_dir, **{"batch_size": global_batch // devices, **overrides})
