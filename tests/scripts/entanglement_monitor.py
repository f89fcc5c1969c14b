"""The GradientEntanglementMonitor in a DPO run on one process, under DDP, and under FSDP2; rank 0 writes the
monitor history to OUT_DIR/<strategy>-<world size>.json.

    python entanglement_monitor.py OUT_DIR HH_DIR STRATEGY      (STRATEGY: single, ddp or fsdp2)

Multi-process runs are started by the test like torchrun does. The global batch is the same on 1 and 2 processes.
"""

import json
import sys
from pathlib import Path

import torch
from common import RANK_ZERO, WORLD_SIZE, hh_pairs, quiet_trainer

from callbacks import GradientEntanglementMonitor
from lit_align import DPOModule

if __name__ == "__main__":
    out_dir, hh_dir, strategy = sys.argv[1:4]
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant")
    monitor = GradientEntanglementMonitor(every_n_steps=1, num_pairs=4, plot=False)
    quiet_trainer(strategy, max_steps=2, callbacks=[monitor]).fit(module, datamodule=hh_pairs(hh_dir))
    if RANK_ZERO:
        (Path(out_dir) / f"{strategy}-{WORLD_SIZE}.json").write_text(json.dumps(monitor.history))
