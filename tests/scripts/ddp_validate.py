"""Validate a DPO policy against a reference on HH pairs with N CPU processes; rank 0 writes the metrics as JSON.
``callbacks.TaskScore`` scores SST-2, Multi30k BLEU and held-out perplexity on odd example counts (uneven shares).

    python ddp_validate.py DEVICES OUT_JSON HH_DIR POLICY_DIR REFERENCE_DIR

Each rank also writes ``OUT_JSON.rank<r>.tokenization.json``: how it got each split (tokenized, or loaded from the
tokenized cache in ``OUT_JSON.cache``).

Run as a script (not inside pytest) because Lightning's DDP launcher re-executes the command line per rank.
"""

import json
import sys

import lightning as L
from common import hh_pairs

from callbacks import TaskScore
from lit_align import DPOModule
from lit_align.tasks import FewShotSST2, HeldoutPerplexity, Multi30kBLEU

if __name__ == "__main__":
    devices, out, hh_dir, policy_dir, reference_dir = sys.argv[1:6]
    module = DPOModule(model=policy_dir, reference_model=reference_dir)
    data = hh_pairs(
        hh_dir, holdout=32, batch_size=4, max_length=48, max_prompt_length=32, shuffle=True, cache_dir=out + ".cache"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(devices),
        strategy="ddp" if int(devices) > 1 else "auto",  # Lightning's own launcher re-runs this script per rank
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            TaskScore(
                [
                    FewShotSST2(shots=2, examples=9),
                    Multi30kBLEU(shots=1, examples=5, max_new_tokens=4),
                    HeldoutPerplexity(file=__file__, texts=7),
                ]
            )
        ],
    )
    trainer.validate(module, datamodule=data, verbose=False)
    with open(f"{out}.rank{trainer.global_rank}.tokenization.json", "w") as handle:
        json.dump(data.tokenization_log, handle)
    if trainer.is_global_zero:
        with open(out, "w") as handle:
            json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, handle)
