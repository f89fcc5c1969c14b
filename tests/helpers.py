"""Plain helpers the tests share: a quiet CPU Trainer, small HH data, ``fit``, ``validate`` and ``metric``.

Tests import them as ``from helpers import ...`` (pytest puts this folder on ``sys.path``, as for ``recording``);
the multi-process scripts in ``scripts/`` reach them through ``scripts/common.py``. Fixtures stay in conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import HHDataModule


def quiet_trainer(max_steps: int = -1, callbacks: Iterable[L.Callback] = (), **overrides) -> L.Trainer:
    """A one-process CPU Trainer without logger, progress bar, model summary, sanity check or validation (pass
    ``limit_val_batches`` to validate); it checkpoints only when a ModelCheckpoint is among the callbacks.
    Keyword arguments override any Trainer setting (``devices``, ``strategy``, ``max_epochs``, ``logger``...)."""
    callbacks = list(callbacks)
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    settings.update(overrides)
    return L.Trainer(**settings)


def hh_pairs(hh_dir, **overrides) -> HHDataModule:
    """HH ``helpful-base`` test rows, short and unshuffled: 4 held out for validation, the next 8 for training in
    batches of 4. Keyword arguments override any ``HHDataModule`` setting."""
    settings = dict(
        data_path=str(hh_dir),
        subsets=["helpful-base"],
        train_split="test",
        val_split=None,
        holdout=4,
        limit_train=8,
        batch_size=4,
        max_length=40,
        max_prompt_length=24,
        shuffle=False,
    )
    settings.update(overrides)
    return HHDataModule(**settings)


def hh_prompts(hh_dir, **overrides) -> HHDataModule:
    """32 shuffled HH prompts of at most 16 tokens, for the sampling modules (PPO, GRPO), validated in one batch of
    32; no validation set. Keyword arguments override any ``HHDataModule`` setting (``batch_size``...)."""
    settings = dict(holdout=0, limit_train=32, eval_batch_size=32, max_length=48, max_prompt_length=16, shuffle=True)
    settings.update(overrides)
    return hh_pairs(hh_dir, **settings)


@torch.no_grad()
def exact_kl_to_reference(module, data: HHDataModule, prompts: int = 64) -> float:
    """Drift of a sampling module (PPO, GRPO): the mean over fresh samples of one batch of up to ``prompts`` training
    prompts (seeded) of Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)), summed over the whole vocabulary at each sampled
    prefix. It is the expectation of the k1 estimate (``drift/kl_to_init``) given the prefixes, with far less
    variance: on the peaked tiny model a k1 mean over 64 samples has a standard error of 0.1-0.3 nats."""
    from lit_align.logprobs import position_ids

    torch.manual_seed(1234)
    sample = module.sample_completions(next(iter(data.dataloader("train", batch_size=prompts))), module.sampling)

    def response_log_softmax(model) -> torch.Tensor:
        mask = sample.attention_mask
        logits = model(input_ids=sample.sequences, attention_mask=mask, position_ids=position_ids(mask)).logits
        return (logits[:, sample.prompt_width - 1 : -1] / module.sampling.temperature).log_softmax(-1)

    policy = response_log_softmax(module.policy)
    with module.reference_forward() as reference:
        reference = response_log_softmax(reference)
    per_token = (policy.exp() * (policy - reference)).sum(-1)
    return float((per_token * sample.response_mask).sum(-1).mean())


def fit(module, data, callbacks: Iterable[L.Callback] = (), max_steps: int = -1, ckpt_path=None, **overrides):
    """``quiet_trainer(max_steps, callbacks, **overrides).fit(module, datamodule=data)``; returns the Trainer."""
    trainer = quiet_trainer(max_steps, callbacks, **overrides)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def metric(trainer: L.Trainer, name: str) -> float:
    """One logged value of the last fit/validate, as a float."""
    return float(trainer.callback_metrics[name])


def validate(module, dataloaders) -> dict[str, float]:
    """Every metric of one validation pass of ``module`` over ``dataloaders``, as floats."""
    trainer = quiet_trainer(limit_val_batches=1.0)
    trainer.validate(module, dataloaders=dataloaders, verbose=False)
    return {name: metric(trainer, name) for name in trainer.callback_metrics}
