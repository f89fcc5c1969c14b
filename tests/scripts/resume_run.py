"""One case of the exact-resume test (tests/test_resume.py): train a module on small data for two epochs.

    python resume_run.py CASE HH_DIR OUT_DIR uninterrupted-then-kill   # full run → OUT/full.pt; then the same run,
                                                                        # SIGKILLed after KILL_AFTER batches
    python resume_run.py CASE HH_DIR OUT_DIR resume                    # from OUT/ckpt/last.ckpt → OUT/resumed.pt

Each training batch writes a checkpoint (``last.ckpt``), validation runs every 3 batches, the data is reshuffled
each epoch, and the kill falls mid-way through the second epoch.
"""

import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import hh_pairs, quiet_trainer  # noqa: E402

from callbacks import ElasticReset, OnlineMerging  # noqa: E402
from datamodules import ControlledGenerationDataModule  # noqa: E402
from lit_align import (  # noqa: E402
    DistributionMatchingModule,
    DPOModule,
    GRPOModule,
    KTOModule,
    PPOModule,
    SFTModule,
)
from lit_align.ebm import PointwiseConstraint, RegexFeature  # noqa: E402
from lit_align.rewards import LexiconSentimentReward  # noqa: E402

BATCHES_PER_EPOCH = 6
TOTAL_BATCHES = 10
KILL_AFTER = 8  # batches: the third batch of the second epoch has not run
SAMPLING = {"max_new_tokens": 6}


def letter_count(prompts, completions, **kwargs):
    return [float(c.count("e")) for c in completions]


def build(case: str, hh_dir: str):
    """(module, datamodule, callbacks) of one case: 24 rows in batches of 4 (6 batches an epoch)."""
    pairs = dict(limit_train=24, batch_size=4, shuffle=True, eval_batch_size=4)
    common = dict(model="tiny-llama", learning_rate=1e-3)
    rollout = dict(reward=LexiconSentimentReward(), sampling=SAMPLING, **common)
    if case == "dpo":
        return DPOModule(**common), hh_pairs(hh_dir, **pairs), []
    if case == "dpo+online_merging":
        merging = OnlineMerging(base_model="tiny-llama", alpha=0.5, keep=0.5)
        return DPOModule(**common), hh_pairs(hh_dir, **pairs), [merging]
    if case == "kto":
        return KTOModule(**common), hh_pairs(hh_dir, **{**pairs, "limit_train": 12}), []
    if case == "sft":
        return SFTModule(**common), hh_pairs(hh_dir, **pairs), []
    if case == "ppo":  # GAE with the value head, two minibatches per rollout
        module = PPOModule(advantage_estimator="gae", num_mini_batches=2, **rollout)
        return module, hh_pairs(hh_dir, **pairs), []
    if case == "rloo+elastic_reset":
        module = PPOModule(advantage_estimator="rloo", samples_per_prompt=2, **rollout)
        return module, hh_pairs(hh_dir, **pairs), [ElasticReset(reset_every=4, decay=0.5)]
    if case == "grpo":
        module = GRPOModule(reward_funcs=[letter_count], num_generations=2, sampling=SAMPLING, **common)
        return module, hh_pairs(hh_dir, **pairs), []
    if case == "dm":
        target = PointwiseConstraint({"a vowel": RegexFeature("[aeiou]")})  # most samples: the weights vary
        module = DistributionMatchingModule(target, sampling=SAMPLING, **common)
        data = ControlledGenerationDataModule(num_train=24, num_val=4, batch_size=4, eval_batch_size=4, seed=0)
        return module, data, []
    raise ValueError(f"unknown case {case!r}")


class KillAfter(L.Callback):
    """SIGKILL this process when training batch ``batches`` + 1 starts (the checkpoint of batch ``batches`` is
    written)."""

    def __init__(self, batches: int) -> None:
        self.batches, self.started = batches, 0

    def on_train_batch_start(self, *args) -> None:
        if self.started == self.batches:
            os.kill(os.getpid(), signal.SIGKILL)
        self.started += 1


class SaveAtStart(L.Callback):
    """Write the weights training starts from to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, module) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({name: tensor.detach().clone() for name, tensor in module.state_dict().items()}, self.path)


def run(case: str, hh_dir: str, out: Path, extra_callbacks=(), ckpt_path=None) -> dict:
    L.seed_everything(0)
    module, data, callbacks = build(case, hh_dir)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_last=True)
    steps_per_batch = module.optimizer_steps_per_batch()
    trainer = quiet_trainer(
        TOTAL_BATCHES * steps_per_batch,
        [*callbacks, checkpoints, *extra_callbacks],
        limit_val_batches=1,
        val_check_interval=3,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    assert trainer.global_step == TOTAL_BATCHES * steps_per_batch, trainer.global_step
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


if __name__ == "__main__":
    case, hh_dir, out, phase = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    if phase == "uninterrupted-then-kill":
        torch.save(run(case, hh_dir, out / "full", [SaveAtStart(out / "full" / "start.pt")]), out / "full.pt")
        run(case, hh_dir, out, extra_callbacks=[KillAfter(KILL_AFTER)])
        raise SystemExit("the run was not killed")
    torch.save(run(case, hh_dir, out, ckpt_path=out / "ckpt" / "last.ckpt"), out / "resumed.pt")
