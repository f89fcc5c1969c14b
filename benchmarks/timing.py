"""What the step-time benchmarks share: step timers for Lightning and for TRL (transformers' Trainer), a quiet
one-process CPU Trainer, and the process's peak RSS. Scripts in benchmarks/ import it as ``timing`` (their own
folder is first on ``sys.path``)."""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from typing import Any

import lightning as L


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak / 1e6


class StepTimer(L.Callback):
    """Start and end of every training step (``on_train_batch_start`` → ``on_train_batch_end``) and its loss."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        if isinstance(outputs, dict) and "loss" in outputs:
            self.losses.append(float(outputs["loss"]))


def trl_step_timer() -> Any:
    """A transformers ``TrainerCallback`` recording each optimizer step's start and end (``on_step_begin`` →
    ``on_step_end``; TRL's online trainers generate inside the step). Built on call: transformers is optional."""
    from transformers import TrainerCallback

    class TRLStepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return TRLStepTimer()


def quiet_trainer(precision: str, max_steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    """One CPU process: no logger, checkpointing, progress bar, model summary or validation."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=callbacks,
    )


def trl_settings(
    name: str,
    max_steps: int,
    learning_rate: float,
    max_grad_norm: float,
    precision: str,
    checkpointing: bool,
    seed: int,
) -> dict[str, Any]:
    """The TrainingArguments every TRL run here shares: one CPU process, nothing logged or saved beyond the trainer's
    log history, torch's fused AdamW at a constant rate without weight decay or warm-up, dropout off, bf16 autocast for
    ``precision="bf16-mixed"`` (``name`` prefixes the scratch output directory)."""
    return dict(
        output_dir=tempfile.mkdtemp(prefix=f"{name}_trl_"),
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused",  # transformers' default; lit-align's AdamW is fused too (and the bare loop's)
        weight_decay=0.0,
        max_grad_norm=max_grad_norm,
        bf16=precision == "bf16-mixed",
        gradient_checkpointing=checkpointing,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        disable_dropout=True,
        seed=seed,
    )
