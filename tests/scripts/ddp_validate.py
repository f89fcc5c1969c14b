"""Validate a DPO policy against a reference on HH pairs with N CPU processes; rank 0 writes the metrics as JSON.
``callbacks.TaskScore`` scores held-out perplexity, and SST-2 and Multi30k BLEU when ../shared has their data, on odd
example counts (uneven shares).

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
from lit_align.tasks import DEFAULT_MULTI30K, DEFAULT_SST2, FewShotSST2, HeldoutPerplexity, Multi30kBLEU

if __name__ == "__main__":
    devices, out, hh_dir, policy_dir, reference_dir = sys.argv[1:6]
    module = DPOModule(model=policy_dir, reference_model=reference_dir)
    data = hh_pairs(
        hh_dir, holdout=32, batch_size=4, max_length=48, max_prompt_length=32, shuffle=True, cache_dir=out + ".cache"
    )
    tasks = [HeldoutPerplexity(file=__file__, texts=7)]  # the shared data's tasks where a clone has ../shared
    if (DEFAULT_SST2 / "dev.tsv.gz").is_file() or (DEFAULT_SST2 / "dev.tsv").is_file():
        tasks.append(FewShotSST2(shots=2, examples=9))
    if DEFAULT_MULTI30K.is_dir():
        tasks.append(Multi30kBLEU(shots=1, examples=5, max_new_tokens=4))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(devices),
        strategy="ddp" if int(devices) > 1 else "auto",  # Lightning's own launcher re-runs this script per rank
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TaskScore(tasks)],
    )
    trainer.validate(module, datamodule=data, verbose=False)
    with open(f"{out}.rank{trainer.global_rank}.tokenization.json", "w") as handle:
        json.dump(data.tokenization_log, handle)
    if trainer.is_global_zero:
        with open(out, "w") as handle:
            json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, handle)
