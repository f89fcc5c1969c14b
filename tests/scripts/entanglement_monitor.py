"""The GradientEntanglementMonitor in a DPO run on one process, under DDP, and under FSDP2; rank 0 writes each
run's monitor history to OUT_DIR/<strategy>-<world size>.json.

    python entanglement_monitor.py OUT_DIR HH_DIR STRATEGY      (STRATEGY: single, ddp or fsdp2)

Multi-process runs are started by the test like torchrun does. The global batch is the same on 1 and 2 processes.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from callbacks import GradientEntanglementMonitor
from datamodules import HHDataModule
from lit_align import DPOModule


def run(devices: int, hh_dir: str, strategy: str) -> list[dict]:
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant")
    data = HHDataModule(
        data_path=hh_dir,
        subsets=["helpful-base"],
        train_split="test",
        val_split=None,
        holdout=4,
        limit_train=8,
        batch_size=4 // devices,
        max_length=40,
        max_prompt_length=24,
        shuffle=False,
    )
    strategies = {
        "ddp": lambda: DDPStrategy(process_group_backend="gloo"),
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
    }
    monitor = GradientEntanglementMonitor(every_n_steps=1, num_pairs=4, plot=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategies[strategy]() if devices > 1 else "auto",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[monitor],
    )
    trainer.fit(module, datamodule=data)
    return monitor.history


if __name__ == "__main__":
    out_dir, hh_dir, strategy = sys.argv[1:4]
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    history = run(devices, hh_dir, strategy)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out_dir) / f"{strategy}-{devices}.json").write_text(json.dumps(history))
