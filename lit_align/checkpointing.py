"""What makes a resumed run continue exactly where it stopped, and a stopped run leave a checkpoint behind.

* Random number generators (``capture_rng_states`` / ``restore_rng_states``): a checkpoint holds every rank's torch
  (CPU and CUDA), Python and NumPy generator states; ``AlignmentModule`` restores them just before the first
  training batch after a resume, so sampling, dropout and minibatch orders continue the interrupted stream.
  Validation runs on a seed of its own (``validation_seed``) and hands the training stream back untouched, so when
  and how often a run validates never changes what it trains on.
* Checkpoint size (``rebuildable_state_keys``): the frozen reference, and under LoRA the policy's frozen base weights,
  are rebuilt from their source by ``configure_model``; checkpoints leave them out.
* Optimizer settings (``apply_configured_optimizer_settings``): Lightning loads the checkpoint's optimizer and
  scheduler states over the configured ones, so a resumed run would keep the old learning rate, weight decay,
  betas and schedule whatever the command line says; the configured ones are put back (moments and step count kept).
* Pre-emption (``SignalStop``): SIGINT (Ctrl-C) or SIGTERM (a cluster's pre-emption) during training stops the run
  after the current step, with a checkpoint; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import math
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

RNG_STATES_KEY = "lit_align_rng_states"
MODULE_CLASS_KEY = "lit_align_module_class"


def capture_rng_states() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), Python and NumPy generator states of this process."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # as a tensor, not an ndarray: Lightning loads checkpoints with torch.load(weights_only=True)
        "numpy": [
            torch.from_numpy(value.astype(np.int64)) if isinstance(value, np.ndarray) else value
            for value in np.random.get_state()
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the generators ``capture_rng_states`` captured."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(tuple(v.numpy().astype(np.uint32) if torch.is_tensor(v) else v for v in states["numpy"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's ``capture_rng_states``, in rank order (a collective when ``world_size`` > 1)."""
    mine = capture_rng_states()
    if world_size == 1 or not dist.is_initialized():
        return [mine]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def validation_seed(seed: int, global_step: int) -> None:
    """Seed every generator for a validation pass at ``global_step``: the same samples wherever a run validates."""
    torch.manual_seed(seed + global_step)
    random.seed(seed + global_step)
    np.random.seed((seed + global_step) % 2**32)


def rebuildable_state_keys(
    policy: nn.Module, reference: nn.Module | None, uses_lora: bool, reference_is_rewritten: bool
) -> set[str]:
    """Names (in the module's state dict: ``policy.*``, ``reference.*``) of tensors ``configure_model`` rebuilds from
    their source, which a checkpoint need not hold: the frozen reference unless a callback rewrites it, and under
    LoRA every policy tensor that does not train (base weights and buffers; tied weights once per name)."""
    keys: set[str] = set()
    if reference is not None and not reference_is_rewritten:
        keys |= {f"reference.{name}" for name in reference.state_dict()}
    if uses_lora:
        for name, value in policy.state_dict(keep_vars=True).items():
            if not (isinstance(value, nn.Parameter) and value.requires_grad):
                keys.add(f"policy.{name}")
    return keys


class SignalStop:
    """While installed, SIGINT and SIGTERM set ``received`` instead of killing the process; a second SIGINT raises
    ``KeyboardInterrupt`` at once. ``AlignmentModule`` checks ``received`` after each training step (every rank
    agrees through a reduction), saves a checkpoint and stops the trainer."""

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Callable | int | None] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        if self.received is not None:
            return  # already stopping: e.g. ``lit-align sweep`` passing on the Ctrl-C this fit got from the terminal
        self.received = signum
        rank_zero_info(
            f"received {signal.Signals(signum).name}: stopping after the current step with a checkpoint "
            "(Ctrl-C again to abort without one)"
        )


def apply_configured_optimizer_settings(trainer: L.Trainer, module: L.LightningModule) -> list[str]:
    """After a resume, make the optimizer and schedule the configured ones again; returns what changed.

    Lightning restores each optimizer's ``param_groups`` (``lr``, ``initial_lr``, ``weight_decay``, ``betas``,
    ``eps``) and each ``LambdaLR``'s ``base_lrs`` from the checkpoint, over what ``configure_optimizers`` built from
    the command line. This builds the configured optimizer and schedule once more (a throw-away copy on the same
    parameters), copies their hyperparameters and lambdas (warm-up and total steps) into the restored ones, and sets
    the current learning rate to the configured schedule at the restored step; Adam's moments and the scheduler's
    step count stay the checkpoint's. With unchanged settings nothing changes (the resume stays exact).
    """
    if len(trainer.optimizers) != 1 or len(trainer.lr_scheduler_configs) != 1:
        return []  # not AlignmentModule.configure_optimizers' one optimizer and one schedule: left as restored
    configured = module.configure_optimizers()
    if not isinstance(configured, dict) or not isinstance(configured.get("lr_scheduler"), dict):
        return []
    fresh_optimizer = configured["optimizer"]
    fresh_scheduler = configured["lr_scheduler"]["scheduler"]
    optimizer, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    if len(optimizer.param_groups) != len(fresh_optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(optimizer.param_groups)} parameter groups, the configured one "
            f"{len(fresh_optimizer.param_groups)}: the trainable parameters changed (LoRA settings?); start a new run"
        )
    changed = []
    for index, (group, fresh) in enumerate(zip(optimizer.param_groups, fresh_optimizer.param_groups, strict=True)):
        for key, value in fresh.items():
            if key in ("params", "lr"):
                continue
            if group.get(key) != value:
                changed.append(f"group {index} {key}: {group.get(key)} -> {value}")
                group[key] = value
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = list(fresh_scheduler.base_lrs)
        scheduler.lr_lambdas = fresh_scheduler.lr_lambdas
        current = [base * schedule(scheduler.last_epoch) for base, schedule in zip(
            scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]  # fmt: skip
        for index, (group, lr) in enumerate(zip(optimizer.param_groups, current, strict=True)):
            if not math.isclose(group["lr"], lr, rel_tol=1e-9, abs_tol=1e-15):
                changed.append(f"group {index} lr at step {scheduler.last_epoch}: {group['lr']:.3g} -> {lr:.3g}")
            group["lr"] = lr
        scheduler._last_lr = current
    return changed


class FitGuard(Callback):
    """Added to every fit by ``AlignmentModule.configure_callbacks``: stops on SIGINT/SIGTERM with a checkpoint
    (``SignalStop``) and notices a fit that made no optimizer step.

    On a signal, after the step in progress every rank saves ``last.ckpt`` in the ModelCheckpoint directory (or
    ``<log dir>/checkpoints``) and the trainer stops; ``on_fit_end`` then exports as usual and the CLI exits with
    128 + the signal number. A fit that made no optimizer step (a KTO batch larger than the train set, ``max_steps`` 0,
    resumed at or past ``max_steps``) warns, sets ``module.made_no_step`` so nothing is exported, and the CLI exits 1.
    """

    def __init__(self) -> None:
        self.signal_stop = SignalStop()
        self.first_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step = None
        self.signal_stop = SignalStop()
        pl_module.stopped_by_signal = None
        pl_module.made_no_step = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step = trainer.global_step  # after a resume: the restored step
        if trainer.ckpt_path is not None and hasattr(pl_module, "total_optimizer_steps"):
            changed = apply_configured_optimizer_settings(trainer, pl_module)
            if changed:
                rank_zero_info("resumed with the configured optimizer settings: " + "; ".join(changed))
        self.signal_stop.install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        received = self.signal_stop.received
        if trainer.world_size > 1:  # stop together: a rank that stopped alone would hang the others' collectives
            received = trainer.strategy.reduce_boolean_decision(received is not None, all=False) and (
                received or signal.SIGTERM
            )
        if not received or trainer.should_stop:
            return
        path = self.interrupt_checkpoint_path(trainer)
        if trainer.is_global_zero and path.is_symlink():
            path.unlink()  # ModelCheckpoint(save_last="link"): write a file, not through the link into its target
        trainer.save_checkpoint(path)
        rank_zero_info(f"stopped by {signal.Signals(received).name} at step {trainer.global_step}; saved {path}")
        pl_module.stopped_by_signal = int(received)
        trainer.should_stop = True

    @staticmethod
    def interrupt_checkpoint_path(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal_stop.uninstall()
        if self.first_step is None or trainer.global_step == self.first_step:
            pl_module.made_no_step = True
            rank_zero_warn(
                f"{type(pl_module).__name__}: this fit made no optimizer step (global step {trainer.global_step}, "
                f"max_steps {trainer.max_steps}, max_epochs {trainer.max_epochs}, "
                f"{trainer.num_training_batches} training batches per epoch). Is the batch larger than the training "
                "set, max_steps 0, or the run resumed at or past max_steps or max_epochs? "
                "Nothing is exported."
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.signal_stop.uninstall()
