"""Exact resume: a run SIGKILLed mid-epoch and resumed from its ``last.ckpt`` ends with the weights of the run that was
never interrupted, for every module, with and without a callback that keeps state (tests/scripts/resume_run.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fit, hh_pairs
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ReferenceSync
from lit_align import DPOModule, LoraSettings

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"
# the cases CI runs; the rest run with -m slow
FAST = ["dpo+online_merging", "rloo+elastic_reset", "dm"]
SLOW = ["dpo", "kto", "sft", "ppo", "grpo"]


def run_script(case: str, hh_dir: Path, out: Path, phase: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), case, str(hh_dir), str(out), phase]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def max_difference(first: dict, second: dict) -> float:
    """Largest |difference| over every tensor of two state dicts (0 for tensors equal elementwise, infinities too)."""
    assert first.keys() == second.keys()
    return max(
        0.0
        if torch.equal(first[name], second[name])
        else float((first[name].float() - second[name].float()).abs().max())
        for name in first
    )


@pytest.mark.parametrize("case", [*FAST, *(pytest.param(case, marks=pytest.mark.slow) for case in SLOW)])
def test_a_run_killed_mid_epoch_and_resumed_ends_with_the_uninterrupted_weights(case, hh_dir, tmp_path):
    killed = run_script(case, hh_dir, tmp_path, "uninterrupted-then-kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    newest_step = max(torch.load(c, weights_only=True, mmap=True)["global_step"] for c in checkpoints)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, mmap=True)
    assert last["global_step"] == newest_step  # last.ckpt never lags behind the newest step checkpoint
    position = {"epoch": 1, "batches": 2, "batch_size": 4, "ranks": 1}  # 2 batches of 4 rows into the 2nd epoch
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]

    resumed = run_script(case, hh_dir, tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    after_resume = torch.load(tmp_path / "resumed.pt", weights_only=True)
    initial_to_final = max_difference(full, torch.load(tmp_path / "full" / "start.pt", weights_only=True))
    assert initial_to_final > 1e-4  # the runs trained
    assert max_difference(full, after_resume) == 0.0


def test_checkpoints_hold_only_what_cannot_be_rebuilt(hh_dir, tmp_path):
    """No frozen reference (rebuilt from its source), under LoRA only the adapters; a callback that rewrites the
    reference keeps it. Each checkpoint resumes (strict loading: the left-out weights are rebuilt)."""

    def checkpoint_of(name: str, callbacks=(), **settings) -> dict:
        saver = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        fit(DPOModule(model="tiny-llama", **settings), hh_pairs(hh_dir), [*callbacks, saver], max_steps=1)
        path = tmp_path / name / "last.ckpt"
        resumed = DPOModule(model="tiny-llama", **settings)
        fit(resumed, hh_pairs(hh_dir), [*callbacks, ModelCheckpoint(dirpath=tmp_path / name)], 2, ckpt_path=path)
        return torch.load(path, weights_only=True)["state_dict"]

    full = checkpoint_of("full")
    assert full and all(key.startswith("policy.") for key in full)
    lora = checkpoint_of("lora", lora=LoraSettings(r=4))
    assert lora and all("lora_" in key for key in lora)
    synced = checkpoint_of("synced", callbacks=[ReferenceSync(alpha=0.5, sync_every=1)])
    assert any(key.startswith("reference.") for key in synced)
    sizes = {name: sum(t.numel() for t in state.values()) for name, state in (("full", full), ("lora", lora))}
    assert sizes["lora"] * 50 < sizes["full"]
