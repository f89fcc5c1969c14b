"""What the multi-process test scripts share: the rank environment, a quiet CPU Trainer for a strategy name, and
the small HH pair data most of them train on. Scripts are started like torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR... in the environment), so Lightning joins those processes instead of launching its own."""

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from datamodules import HHDataModule

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
    """A CPU Trainer without logger, progress bar or validation (unless overridden); checkpoints only when a
    ModelCheckpoint is among the callbacks."""
    settings = dict(
        accelerator="cpu",
        devices=devices,
        strategy=make_strategy(strategy, devices),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    settings.update(overrides)
    return L.Trainer(**settings)


def hh_pairs(hh_dir: str, global_batch: int = 4, devices: int = WORLD_SIZE, **overrides) -> HHDataModule:
    """HH ``helpful-base`` test pairs, short, unshuffled; the same global batch on any number of ranks."""
    settings = dict(
        data_path=hh_dir,
        subsets=["helpful-base"],
        train_split="test",
        val_split=None,
        holdout=4,
        limit_train=8,
        batch_size=global_batch // devices,
        max_length=40,
        max_prompt_length=24,
        shuffle=False,
    )
    settings.update(overrides)
    return HHDataModule(**settings)
