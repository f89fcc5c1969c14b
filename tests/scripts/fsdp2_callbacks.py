"""Each alignment-tax callback in a DPO run under FSDP2 (or one process), uninterrupted and resumed from a (sharded)
checkpoint; rank 0 saves the full final weights of every run to OUT_DIR/<callback>-{full,resumed}.pt.

    python fsdp2_callbacks.py OUT_DIR HH_DIR BASE_DIR SOUP_A SOUP_B

Multi-process runs are started by the test like torchrun does (RANK, WORLD_SIZE, ... in the environment), so one
process group serves all runs. The global batch is the same on 1 and 2 processes.
"""

import json
import sys
from pathlib import Path

import torch
from common import RANK_ZERO, WORLD_SIZE, hh_pairs, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from callbacks import ElasticReset, OnlineMerging, ReferenceSoup, ReferenceSync, WeightInterpolation
from lit_align import DPOModule


def make_callbacks(base_dir: str, soup_a: str, soup_b: str) -> dict:
    return {
        "elastic_reset": lambda: ElasticReset(reset_every=3, decay=0.5),
        "interpolation": lambda: WeightInterpolation(alpha=0.5, block_alphas=[0.2, 0.8]),
        "reference_soup": lambda: ReferenceSoup([soup_a, soup_b], weights=[0.25, 0.75], init_policy=True),
        "online_merging": lambda: OnlineMerging(base_model=base_dir, alpha=0.3, keep=0.5),
        "reference_sync": lambda: ReferenceSync(alpha=0.5, sync_every=3),
    }


def run(hh_dir: str, callbacks: list, max_steps: int, ckpt_path: str | None = None) -> DPOModule:
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant")
    trainer = quiet_trainer("fsdp2", max_steps, callbacks)
    trainer.fit(module, datamodule=hh_pairs(hh_dir), ckpt_path=ckpt_path)
    return module


def full_state(module: DPOModule) -> dict[str, torch.Tensor]:
    """Policy, reference and callback snapshots, gathered whole (collective: every rank calls it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {}
    for prefix in ("policy", "reference"):
        part = get_model_state_dict(getattr(module, prefix), options=options)
        state.update({f"{prefix}.{k}": v for k, v in part.items()})
    for name, store in getattr(module, "callback_weights", {}).items():
        for tensor_name in store.names:
            whole = store.whole(tensor_name)
            state[f"callback_weights.{name}.{tensor_name}"] = (
                whole.full_tensor() if hasattr(whole, "full_tensor") else whole
            ).cpu()
    return state


def store_sizes(module: DPOModule) -> dict[str, int]:
    """Elements of the callback snapshots this rank holds, and of the whole snapshots."""
    local = whole = 0
    for store in getattr(module, "callback_weights", {}).values():
        for name in store.names:
            local += store[name].numel()
            whole += store.whole(name).numel()
    return {"local": local, "whole": whole}


if __name__ == "__main__":
    out_dir, hh_dir, base_dir, soup_a, soup_b = sys.argv[1:6]
    devices = WORLD_SIZE
    out = Path(out_dir)
    for name, make in make_callbacks(base_dir, soup_a, soup_b).items():
        module = run(hh_dir, [make()], max_steps=4)
        state, sizes = full_state(module), store_sizes(module)
        checkpoints = ModelCheckpoint(dirpath=out / f"{name}-ckpt-{devices}", every_n_train_steps=2, save_top_k=-1)
        run(hh_dir, [make(), checkpoints], max_steps=2)
        resumed = run(hh_dir, [make()], 4, str(out / f"{name}-ckpt-{devices}" / "epoch=0-step=2.ckpt"))
        resumed_state = full_state(resumed)
        if RANK_ZERO:
            torch.save(state, out / f"{name}-full-{devices}.pt")
            torch.save(resumed_state, out / f"{name}-resumed-{devices}.pt")
            (out / f"{name}-sizes-{devices}.json").write_text(json.dumps(sizes))
