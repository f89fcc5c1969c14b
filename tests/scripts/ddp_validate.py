"""Validate a DPO policy against a reference on HH pairs with N CPU processes; rank 0 writes the metrics as JSON.

    python ddp_validate.py DEVICES OUT_JSON HH_DIR POLICY_DIR REFERENCE_DIR

Run as a script (not inside pytest) because Lightning's DDP launcher re-executes the command line per rank.
"""

import json
import sys

import lightning as L

from datamodules import HHDataModule
from lit_align import DPOModule

if __name__ == "__main__":
    devices, out, hh_dir, policy_dir, reference_dir = sys.argv[1:6]
    module = DPOModule(model=policy_dir, reference_model=reference_dir)
    data = HHDataModule(
        data_path=hh_dir,
        subsets=["helpful-base"],
        train_split="test",
        val_split=None,
        holdout=32,
        limit_train=8,
        batch_size=4,
        max_length=48,
        max_prompt_length=32,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(devices),
        strategy="ddp" if int(devices) > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        with open(out, "w") as handle:
            json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, handle)
