"""DPO for a few steps under FSDP2 (ModelParallelStrategy, N CPU processes), then export; rank 0 writes JSON.

    python fsdp2_dpo.py DEVICES OUT_JSON HH_DIR EXPORT_DIR [STRATEGY]

Every step sees all 4 training pairs (global batch 4), so 1 process and N processes must take the same steps
whatever order the distributed sampler chooses.
"""

import json
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from datamodules import HHDataModule
from lit_align import DPOModule

# Adam's first steps are ≈ lr·sign(g): where |g| is near eps, float noise from summing gradients in another order
# (2 ranks vs 1) flips whole updates. A larger eps bounds that amplification (lr/eps per unit of gradient noise),
# so weights can be compared tightly; the default 1e-8 made this comparison flaky across CPUs.
ADAM_EPSILON = 1e-4

if __name__ == "__main__":
    devices, out, hh_dir, export_dir = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    devices = int(devices)
    torch.manual_seed(0)
    module = DPOModule(
        model="tiny-llama",
        learning_rate=1e-3,
        lr_scheduler="constant",
        export_dir=export_dir,
        adam_epsilon=ADAM_EPSILON,
    )
    data = HHDataModule(
        data_path=hh_dir,
        subsets=["helpful-base"],
        train_split="test",
        val_split=None,
        holdout=8,
        limit_train=4,
        batch_size=4 // devices,
        eval_batch_size=4 // devices,
        max_length=48,
        max_prompt_length=32,
    )
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    if len(sys.argv) > 5:
        strategy = sys.argv[5]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(module.policy, FSDPModule)
    if trainer.is_global_zero:
        with open(out, "w") as handle:
            json.dump({"sharded": sharded, **{k: float(v) for k, v in trainer.callback_metrics.items()}}, handle)
