"""DPO for a few steps under FSDP2 (ModelParallelStrategy, N CPU processes), then export; rank 0 writes JSON.

    python fsdp2_dpo.py DEVICES OUT_JSON HH_DIR EXPORT_DIR [STRATEGY]

Every step sees all 4 training pairs (global batch 4), so 1 process and N processes must take the same steps
whatever order the distributed sampler chooses.
"""

import json
import sys

import torch
from common import hh_pairs, quiet_trainer
from torch.distributed.fsdp import FSDPModule

from lit_align import DPOModule

if __name__ == "__main__":
    devices, out, hh_dir, export_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant", export_dir=export_dir)
    data = hh_pairs(hh_dir, devices=devices, holdout=8, limit_train=4, eval_batch_size=4 // devices, max_length=48,
                    max_prompt_length=32, shuffle=True)  # fmt: skip
    trainer = quiet_trainer(sys.argv[5] if len(sys.argv) > 5 else "fsdp2", max_steps=3, devices=devices,
                            limit_val_batches=1.0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        with open(out, "w") as handle:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            json.dump({"sharded": isinstance(module.policy, FSDPModule), **metrics}, handle)
