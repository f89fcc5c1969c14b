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
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]

    resumed = run_script(case, hh_dir, tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    after_resume = torch.load(tmp_path / "resumed.pt", weights_only=True)
    initial_to_final = max_difference(full, torch.load(tmp_path / "full" / "start.pt", weights_only=True))
    assert initial_to_final > 1e-4  # the runs trained
    assert max_difference(full, after_resume) == 0.0
