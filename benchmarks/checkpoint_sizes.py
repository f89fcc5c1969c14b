"""Checkpoint size per module on the embedded SmolLM2-135M, after one optimizer step: what a checkpoint holds now
(no frozen reference; under LoRA only the adapters) against what it held before (every tensor of the module).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/checkpoint_sizes.py ../shared/data/hh_rlhf

Prints one row per case: tensor elements in the state dict (a tied head counts twice; the file stores it once),
the file size, and the file size plus the tensors now left out.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import HHDataModule
from lit_align import DPOModule, LoraSettings, PPOModule
from lit_align.rewards import LexiconSentimentReward


def data(hh_dir: str) -> HHDataModule:
    settings = dict(subsets=["helpful-base"], train_split="test", val_split=None, limit_train=4, batch_size=2)
    return HHDataModule(data_path=hh_dir, max_length=64, max_prompt_length=32, **settings)


def measure(name: str, module: L.LightningModule, hh_dir: str) -> str:
    with tempfile.TemporaryDirectory() as directory:
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=module.optimizer_steps_per_batch(),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[ModelCheckpoint(dirpath=directory, save_last=True)],
        )
        trainer.fit(module, datamodule=data(hh_dir))
        path = Path(directory) / "last.ckpt"
        saved = torch.load(path, weights_only=True)["state_dict"]
        left_out = module.rebuildable_state_keys()
        state = module.state_dict()
        left_out_bytes = sum(state[k].numel() * state[k].element_size() for k in left_out)
        return (
            f"| {name} | {sum(t.numel() for t in saved.values()) / 1e6:.2f} M | {path.stat().st_size / 1e6:.0f} MB | "
            f"{(path.stat().st_size + left_out_bytes) / 1e6:.0f} MB |"
        )


if __name__ == "__main__":
    hh_dir = sys.argv[1]
    reward = LexiconSentimentReward()
    rows = [
        measure("DPO, all weights", DPOModule(), hh_dir),
        measure("DPO, LoRA r=16 all-linear", DPOModule(lora=LoraSettings(r=16)), hh_dir),
        measure("PPO (GAE, value head), all weights", PPOModule(reward=reward, sampling={"max_new_tokens": 4}), hh_dir),
    ]
    print("| module | parameters saved | checkpoint | before (with the reference / base weights) |")
    print("|---|---|---|---|")
    print("\n".join(rows))
