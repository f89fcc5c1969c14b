"""Sampling from an FSDP2-sharded policy: the same seed and prompts give the same tokens as one unsharded process,
with ``gather_for_generation`` on (one all-gather per FSDP unit per call) and off (all-gathers every token).
Rank 0 writes OUT_DIR/generation-<world size>.json.

    python sharded_generation.py OUT_DIR

Multi-process runs are started by the test like torchrun does; ``ModelParallelStrategy`` shards the module.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from common import RANK_ZERO, WORLD_SIZE, quiet_trainer
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

from lit_align import DPOModule, SamplingSettings

ALL_GATHERS = {"count": 0}
_foreach_all_gather = _fsdp_param_group.foreach_all_gather


def counting_all_gather(*args, **kwargs):
    ALL_GATHERS["count"] += 1
    return _foreach_all_gather(*args, **kwargs)


_fsdp_param_group.foreach_all_gather = counting_all_gather  # instrumentation only: the real all-gather runs


class SampleAtStart(L.Callback):
    def __init__(self) -> None:
        self.results: dict = {}

    def on_fit_start(self, trainer: L.Trainer, module: DPOModule) -> None:  # the module is sharded by now
        module.tokenizer.padding_side = "left"
        encoded = module.tokenizer(["The weather today is", "My favourite food"], padding=True, return_tensors="pt")
        for gather in (True, False):
            module.hparams.gather_for_generation = gather
            torch.manual_seed(123)
            ALL_GATHERS["count"] = 0
            sequences, _, response_mask = module.generate_responses(
                module.policy,
                encoded.input_ids,
                encoded.attention_mask,
                SamplingSettings(max_new_tokens=8, min_new_tokens=8),
            )
            self.results[str(gather)] = {
                "sequences": sequences.tolist(),
                "response_tokens": int(response_mask.sum()),
                "all_gathers": ALL_GATHERS["count"],
            }
        self.results["fsdp_units"] = sum(isinstance(m, FSDPModule) for m in module.policy.modules())
        self.results["sharded"] = isinstance(module.policy, FSDPModule)


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    sampler = SampleAtStart()
    module = DPOModule(model="tiny-llama")
    module.train_dataloader = lambda: torch.utils.data.DataLoader([0])  # max_steps=0: fit only sets up
    quiet_trainer("fsdp2", max_steps=0, callbacks=[sampler]).fit(module)
    if RANK_ZERO:
        (out_dir / f"generation-{WORLD_SIZE}.json").write_text(json.dumps(sampler.results))
