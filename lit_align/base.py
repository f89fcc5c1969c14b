"""``AlignmentModule``: what every alignment LightningModule shares — models and reference, the DataModule hand-off,
optimizer and schedule, metrics logging, the callback hooks, export.

One algorithm per subclass file (``dpo.py``, ``kto.py``, ...). Log-probs live in ``logprobs.py``, sampling in
``generation.py``, FSDP2 sharding mechanics in ``strategies.py``; what the modules that train on their own samples
(PPO, GRPO) share is the ``RolloutMechanics`` mixin in ``rollout.py``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from transformers import PreTrainedModel, SchedulerType, get_scheduler

from datamodules.keys import INDEX, PROMPT_ATTENTION_MASK, PROMPT_INPUT_IDS
from lit_align.checkpointing import (
    MODULE_CLASS_KEY,
    RNG_STATES_KEY,
    FitGuard,
    capture_rng_states,
    gather_rng_states,
    rebuildable_state_keys,
    restore_rng_states,
    validation_seed,
)
from lit_align.export import logged_metrics, read_metadata, write_model_card
from lit_align.generation import (
    Completions,
    SamplingSettings,
    decode_responses,
    ends_with_eos,
    repeat_rows,
    sample_responses,
)
from lit_align.logprobs import ResponseLogps, SequenceLogps, response_logprobs, sequence_logprobs
from lit_align.metrics import StageMetrics
from lit_align.models import (
    EMBEDDED_MODEL,
    LoraSettings,
    apply_lora,
    compile_decoder_layers,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from lit_align.reporting import log_completions_table
from lit_align.strategies import full_state_dict, fully_shard_models, gathered_weights

# schedules ``get_scheduler`` cannot build from (warm-up, total steps) alone, or that step on a monitored metric
_SCHEDULERS_NEEDING_MORE = {
    "reduce_lr_on_plateau",
    "greedy",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
}
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where configure_optimizers asks torch for its fused AdamW kernel
LR_SCHEDULERS = tuple(t.value for t in SchedulerType if t.value not in _SCHEDULERS_NEEDING_MORE)
"""``lr_scheduler`` names ``AlignmentModule`` accepts: the ``transformers.SchedulerType`` values it can build."""


def check_optimizer_settings(learning_rate: float, lr_scheduler: str, warmup_ratio: float, warmup_steps: int) -> None:
    """Refuse optimizer settings that could never train, at construction (before any model loads): a ValueError
    naming the argument and its value."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if lr_scheduler not in LR_SCHEDULERS:
        known = lr_scheduler in {t.value for t in SchedulerType}
        why = "needs arguments or a monitored metric AlignmentModule does not pass" if known else "is unknown"
        raise ValueError(f"lr_scheduler {lr_scheduler!r} {why}; valid names: {', '.join(LR_SCHEDULERS)}")
    if not warmup_steps >= 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0 <= warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if lr_scheduler == "constant" and (warmup_steps or warmup_ratio):
        raise ValueError(
            f"lr_scheduler 'constant' ignores warm-up (warmup_steps={warmup_steps}, warmup_ratio={warmup_ratio}); "
            "use 'constant_with_warmup'"
        )


def check_writable_directory(path: str | Path, option: str) -> None:
    """Create ``path`` if needed and refuse one that cannot be written, naming ``option`` (checked at fit start, so a
    typo does not cost a training run)."""
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option}={str(path)!r} cannot be created: {err.strerror}") from err
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise ValueError(f"{option}={str(path)!r} is not a writable directory")


class AlignmentModule(L.LightningModule):
    """Base LightningModule: policy, optional frozen reference, tokenizer, AdamW + schedule, export.

    Subclasses set ``data_mode`` (which batches the DataModule builds for them) and ``uses_reference``.
    Models are created in ``configure_model`` (idempotent; under ``ModelParallelStrategy`` each decoder layer is
    sharded with FSDP2's ``fully_shard``). With LoRA the reference is the policy with adapters disabled, so no
    second copy of the weights is kept.

    Args:
        model: Hub id, local directory, ``"smollm2-135m-instruct"`` (embedded offline model) or ``"tiny-llama"``.
        reference_model: where the reference weights come from (default: a frozen copy of the initial policy).
        tokenizer: tokenizer source (default: the model's).
        lora: LoRA settings (peft); None trains all weights.
        dtype: parameter dtype of the loaded models (``float32``, ``bfloat16``; use bf16 only on hardware for it).
            For bf16 training prefer the trainer's ``precision: bf16-mixed`` with fp32 weights: AdamW steps of
            lr ≈ 1e-6 are below bf16's resolution for most weights and would be rounded away.
        reference_dtype: dtype the frozen reference is held in (default: ``dtype``). ``bfloat16`` halves its memory
            and, on hardware with bf16 matrix units, speeds up its forward; its log-probs then carry bf16 rounding
            (benchmarks/README.md, "bf16"). Not with ``lora``, whose reference is the policy with adapters off.
        learning_rate, weight_decay, adam_betas, adam_epsilon: AdamW settings (no decay on biases and norms).
        lr_scheduler: a ``transformers.get_scheduler`` name in ``LR_SCHEDULERS`` (``cosine``, ``linear``,
            ``constant_with_warmup``...). Bad optimizer settings raise ``ValueError`` at construction
            (:func:`check_optimizer_settings`).
        warmup_ratio, warmup_steps: linear warm-up, as a fraction of all optimizer steps or a count (count wins).
        gradient_checkpointing: activation checkpointing per decoder layer (transformers' non-reentrant
            checkpointing, which composes with FSDP2's per-layer sharding): trade compute for activation memory.
        logprob_chunk_size: compute the output layer and the log-probs (DPO/KTO/SFT/reward-free scoring; PPO, GRPO
            and DM response log-probs, GRPO's entropy) this many positions at a time, recomputing each chunk in
            backward (``logprobs.chunked_token_logprobs``): peak memory grows with chunk × vocabulary instead of
            tokens × vocabulary. ``None``: one [B, T, V] logits tensor (Hugging Face's forward). Falls back to the
            plain forward where the model's head is not a plain linear layer or its weights are sharded (FSDP2).
        compile_layers: ``torch.compile`` each decoder layer of the policy and of the reference (inductor, dynamic
            shapes): the first batches of each new shape pay the compilation (minutes on a CPU), later steps run the
            compiled layers (benchmarks/README.md, "torch.compile"). Needs a C++ compiler on CPU, Triton on GPU.
        gather_for_generation: under FSDP2, all-gather a model's weights once per ``generate`` call and keep them
            until it returns, instead of gathering and freeing each layer for every new token. Costs one full,
            unsharded copy of that model's weights per rank during generation (as under DDP); set False when
            that does not fit, and each token then pays one all-gather per layer.
        disable_dropout: zero every dropout in the policy, LoRA's included (TRL's default for preference and RL
            training).
        export_dir: if set, the trained policy is saved there with ``save_pretrained`` at the end of fit (with a
            model card, ``lit_align/export.py``); not after a fit that made no optimizer step.
        export_every_checkpoint: also export to ``<export_dir>/step-<global step>`` at every checkpoint save.
        seed: seed for ``tiny-llama`` weights.
    """

    data_mode: ClassVar[str] = "pair"
    uses_reference: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = ("loss",)
    progress_bar_metrics: ClassVar[tuple[str, ...]] = ("loss",)
    paper: ClassVar[str] = ""  # the method's paper, for exported model cards
    # Arguments that are objects (a reward, a target): left out of the hyperparameters, so no reward model is pickled
    # into a checkpoint. The CLI puts back the config they were built from (AlignCLI.after_instantiate_classes), so a
    # checkpoint of `lit-align fit` still rebuilds them in load_from_checkpoint and `lit-align export`.
    object_arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        reference_model: str | None = None,
        tokenizer: str | None = None,
        lora: LoraSettings | None = None,
        dtype: str = "float32",
        reference_dtype: str | None = None,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_epsilon: float = 1e-8,
        lr_scheduler: str = "cosine",
        warmup_ratio: float = 0.0,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int | None = None,
        compile_layers: bool = False,
        gather_for_generation: bool = True,
        disable_dropout: bool = True,
        export_dir: str | None = None,
        export_every_checkpoint: bool = False,
        seed: int = 0,
    ) -> None:
        check_optimizer_settings(learning_rate, lr_scheduler, warmup_ratio, warmup_steps)
        torch_dtype(dtype)
        if reference_dtype is not None:
            torch_dtype(reference_dtype)
            if lora is not None:
                raise ValueError(
                    f"reference_dtype={reference_dtype!r} has no effect with lora: the reference is the policy with "
                    "its adapters off, held in dtype; drop reference_dtype or set dtype"
                )
        if logprob_chunk_size is not None and logprob_chunk_size < 1:
            raise ValueError(f"logprob_chunk_size must be >= 1 (or None: no chunking), got {logprob_chunk_size}")
        super().__init__()
        self.save_hyperparameters(ignore=list(self.object_arguments))
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.policy: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.metrics = StageMetrics(self.metric_names, self.extra_metrics())
        self._batch_index: Tensor | None = None
        self.callback_weights = nn.ModuleDict()  # weight snapshots of callbacks (see callback_weight_store)
        self._rng_to_restore: dict | None = None  # this rank's generators from a checkpoint, set at the next step
        self._rng_outside_validation: dict | None = None
        self.stopped_by_signal: int | None = None  # set by FitGuard
        self.made_no_step = False  # set by FitGuard: a fit without an optimizer step exports nothing
        self.checkpoint_global_step: int | None = None  # of the checkpoint loaded outside a fit (model cards)
        self.checkpoint_data: dict | None = None

    # ---- data: the one hand-off to the DataModule -------------------------------------------------------------

    def _attach_datamodule(self, stage: str) -> Any:
        """Give the trainer's DataModule this module's tokenizer and data mode (``attach``); returns it, or
        ``None`` when it takes no attach (a plain LightningDataModule)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        attach = getattr(datamodule, "attach", None)
        if not callable(attach):
            return None
        # predict samples completions of prompts, whatever the module trains on
        return attach(self.tokenizer, "prompt" if stage == "predict" else self.data_mode)

    def prepare_data(self) -> None:
        """Tokenize the DataModule's splits into its cache once per node (Lightning runs this on local rank 0 while
        the other ranks wait); every rank's ``setup`` then loads them."""
        stage = self.trainer.state.fn.value if self.trainer.state.fn else "fit"
        datamodule = self._attach_datamodule(stage)
        if datamodule is not None and hasattr(datamodule, "prepare_tokenized"):
            datamodule.prepare_tokenized(stage)

    def setup(self, stage: str) -> None:
        """Tell the trainer's DataModule which tokenizer and data mode this module needs (``attach``); Lightning
        runs this after ``datamodule.setup``, and the DataModule tokenizes (or loads its cache) on first use. A
        DataModule built with its own ``mode=`` keeps that mode."""
        self._attach_datamodule(stage)
        if stage == "fit" and self.hparams.export_dir:
            check_writable_directory(self.hparams.export_dir, "export_dir")  # before any model loads
        if stage in ("validate", "test") and self.uses_reference and self.reference_source() == self.hparams.model:
            rank_zero_warn(
                f"{type(self).__name__}: evaluating {self.hparams.model} against itself (no reference_model and no "
                "lit_align.json recording one): the policy and the reference are the same weights, so rewards and KL "
                "are 0 by construction. Set --model.init_args.reference_model to the model training started from."
            )

    # ---- models ---------------------------------------------------------------------------------------------

    def extra_metrics(self) -> dict:
        """Metrics that are not plain means (name → torchmetrics class); subclasses extend."""
        return {}

    def build_policy(self) -> PreTrainedModel:
        return load_causal_lm(self.hparams.model, self.hparams.dtype, self.hparams.seed)

    @property
    def uses_lora(self) -> bool:
        return self.hparams.lora is not None

    def needs_reference_model(self) -> bool:
        """Whether a separate reference copy must be held in memory (not with LoRA, not reference-free)."""
        return self.uses_reference and not self.uses_lora

    def configure_model(self) -> None:
        if self.policy is None:
            self.build_models()
        # Lightning has no callback hook between building the model and restoring a checkpoint into it; callbacks
        # that keep weights (callbacks/weights.py) allocate them here, after sharding and before any restore.
        self.call_callbacks("on_configure_model")

    def build_models(self) -> None:
        """Policy, reference and extra modules, then FSDP2 sharding under ``ModelParallelStrategy``."""
        policy = self.build_policy()
        if self.needs_reference_model():
            source = self.reference_source()
            dtype = self.hparams.reference_dtype or self.hparams.dtype
            if source == self.hparams.model:
                reference = copy.deepcopy(policy).to(torch_dtype(dtype))
            else:
                reference = load_causal_lm(source, dtype, self.hparams.seed)
            self.reference = reference.eval().requires_grad_(False)
        if self.uses_lora:
            policy = apply_lora(policy, self.hparams.lora, task_type=self.lora_task_type)
        if self.hparams.disable_dropout:  # after LoRA, so the adapters' dropout goes too (as TRL)
            for module in policy.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        if self.hparams.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.config.use_cache = False
        self.policy = policy.train()  # from_pretrained returns eval mode; HF checkpointing needs train mode
        if self.hparams.compile_layers:
            for model in (self.policy, self.reference):
                if model is not None:
                    compile_decoder_layers(model)
        self.build_extra_modules()
        self._shard_for_model_parallel()

    def reference_source(self) -> str:
        """Where the reference weights come from: ``reference_model``; else, for a policy exported by lit-align, the
        reference it was trained against (its ``lit_align.json``); else the initial policy itself."""
        if self.hparams.reference_model is not None:
            return self.hparams.reference_model
        metadata = read_metadata(self.hparams.model)
        if metadata and metadata.get("reference_model") and metadata["reference_model"] != self.hparams.model:
            rank_zero_info(
                f"reference model: {metadata['reference_model']} (recorded in {self.hparams.model}/lit_align.json as "
                "the reference this policy was trained against; set reference_model to use another)"
            )
            return metadata["reference_model"]
        return self.hparams.model

    def build_extra_modules(self) -> None:
        """Hook for modules besides the policy and reference (PPO's value head, a DPG proposal), built before
        sharding."""

    def extra_trainable_modules(self) -> list[nn.Module]:
        """Trainable modules besides the policy: optimised and sharded with it."""
        return []

    def extra_frozen_modules(self) -> list[nn.Module]:
        """Frozen models besides the reference (e.g. distribution matching's proposal): sharded, kept in eval mode."""
        return []

    lora_task_type: ClassVar[str] = "CAUSAL_LM"

    def _shard_for_model_parallel(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard every model this module holds; nothing otherwise."""
        if self.device_mesh is not None:
            models = (self.policy, self.reference, *self.extra_trainable_modules(), *self.extra_frozen_modules())
            fully_shard_models(models, self.device_mesh)

    def train(self, mode: bool = True) -> AlignmentModule:
        """Keep the frozen reference (and other frozen models) in eval mode whatever Lightning sets."""
        super().train(mode)
        for frozen in (self.reference, *self.extra_frozen_modules()):
            if frozen is not None:
                frozen.eval()
        return self

    # ---- log-probs ------------------------------------------------------------------------------------------

    def policy_logprobs(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> SequenceLogps:
        chunk = self.hparams.get("logprob_chunk_size")
        return sequence_logprobs(self.policy, input_ids, attention_mask, completion_mask, chunk)

    def response_logprobs_of(
        self,
        model: nn.Module,
        sequences: Tensor,
        attention_mask: Tensor,
        prompt_width: int,
        temperature: float,
        with_entropy: bool = False,
        output_hidden: bool = False,
    ) -> ResponseLogps:
        """``logprobs.response_logprobs`` of sampled responses under ``model``, with this module's
        ``logprob_chunk_size`` (PPO, GRPO, DM and the drift metrics of fresh samples)."""
        chunk = self.hparams.get("logprob_chunk_size")
        return response_logprobs(
            model, sequences, attention_mask, prompt_width, temperature, with_entropy, output_hidden, chunk
        )

    @contextmanager
    def reference_forward(self) -> Iterator[nn.Module]:
        """The model that acts as the reference, for forward passes without gradient inside the block: the frozen
        copy, or under LoRA the policy with its adapters disabled (no second copy of the weights)."""
        with torch.no_grad():
            if self.reference is not None:
                yield self.reference
            elif self.uses_lora:
                with self.policy.disable_adapter():
                    yield self.policy
            else:
                raise RuntimeError(
                    f"{type(self).__name__} has no reference model (it was released after precomputing reference "
                    "log-probs, or the loss is reference-free) but a reference forward was requested"
                )

    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> SequenceLogps:
        with self.reference_forward() as reference:
            chunk = self.hparams.get("logprob_chunk_size")
            return sequence_logprobs(reference, input_ids, attention_mask, completion_mask, chunk)

    # ---- sampling -------------------------------------------------------------------------------------------------

    def generate_responses(
        self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingSettings
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`sample_responses` from ``model`` (policy, proposal...), correct under sharding.

        With more than one rank ``synced_gpus`` keeps every rank calling forward until all are done (an FSDP
        rank that stopped early would leave the others waiting in an all-gather). Under FSDP2 with
        ``gather_for_generation`` the weights are all-gathered once for the whole call (see the argument).
        """
        synced = self.num_ranks > 1
        with gathered_weights(model) if self.hparams.gather_for_generation else nullcontext():
            return sample_responses(model, self.tokenizer, prompt_ids, prompt_mask, sampling, synced_gpus=synced)

    def sample_completions(self, batch: dict, sampling: SamplingSettings, samples_per_prompt: int = 1) -> Completions:
        """``samples_per_prompt`` completions per prompt of a ``prompt``-mode batch, sampled from the policy and
        decoded: the rollout of PPO and GRPO and their evaluation. Rows are grouped by prompt and the batch's columns
        are repeated to match (``Completions.batch``), so a reward reads each completion's own reference."""
        k = samples_per_prompt
        prompt_ids = batch[PROMPT_INPUT_IDS].repeat_interleave(k, dim=0)
        prompt_mask = batch[PROMPT_ATTENTION_MASK].repeat_interleave(k, dim=0)
        width = prompt_ids.shape[1]
        sequences, attention_mask, response_mask = self.generate_responses(
            self.policy, prompt_ids, prompt_mask, sampling
        )
        prompts, completions = decode_responses(self.tokenizer, sequences, width, response_mask)
        has_eos = ends_with_eos(sequences[:, width:], response_mask, self.tokenizer.eos_token_id)
        repeated = {key: repeat_rows(value, k) for key, value in batch.items()}
        return Completions(sequences, attention_mask, response_mask, width, prompts, completions, has_eos, repeated)

    completions_logged: ClassVar[int] = 8  # rows of the completions table each validation logs

    def log_completions(self, stage: str, prompts: list[str], completions: list[str], **columns: Tensor) -> None:
        """A table of the first ``completions_logged`` (prompt, completion, reward...) rows at this step, for every
        logger (``lit_align/reporting.py``: CSV → ``<log dir>/eval_completions.jsonl``, TensorBoard, W&B)."""
        if self._trainer is None or self.trainer.sanity_checking and self.global_step > 0:
            return
        count = min(self.completions_logged, len(completions))
        rows = [{"prompt": prompts[i], "completion": completions[i]} for i in range(count)]
        for name, values in columns.items():
            for row, value in zip(rows, values[:count].tolist(), strict=True):
                row[name] = value
        log_completions_table(self.trainer, self.metrics.log_name(stage, "completions"), rows, self.global_step)

    # ---- prediction: ``lit-align predict`` writes completions of a prompt set as JSONL ------------------------

    def prediction_sampling(self) -> SamplingSettings:
        """How ``predict`` samples: the module's own ``sampling`` (PPO, GRPO, DM), else the defaults."""
        return getattr(self, "sampling", None) or SamplingSettings()

    def prediction_scores(self, sample: Completions) -> Tensor | None:
        """Rewards of predicted completions; None for modules without a reward (DPO, KTO, SFT...)."""
        return None

    def predictions_path(self) -> Path:
        """``<log dir>/predictions.jsonl`` (rank r > 0: ``predictions.rank<r>.jsonl``)."""
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        rank = self.trainer.global_rank
        return directory / ("predictions.jsonl" if rank == 0 else f"predictions.rank{rank}.jsonl")

    def on_predict_start(self) -> None:
        path = self.predictions_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One completion per prompt (``prediction_sampling``), with its reward when the module has one; appended to
        ``predictions_path()`` as JSON lines ``{prompt, completion, reward?}`` and returned."""
        sample = self.sample_completions(batch, self.prediction_sampling())
        scores = self.prediction_scores(sample)
        rows = [{"prompt": p, "completion": c} for p, c in zip(sample.prompts, sample.completions, strict=True)]
        if scores is not None:
            for row, score in zip(rows, scores.tolist(), strict=True):
                row["reward"] = score
        with self.predictions_path().open("a") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return rows

    def on_predict_end(self) -> None:
        rank_zero_info(f"predictions written to {self.predictions_path()}")

    # ---- steps: each algorithm implements ``shared_step(batch, stage)`` ----------------------------------------

    def shared_step(self, batch: dict, stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    # ---- metrics and safety ---------------------------------------------------------------------------------

    def log_values(self, stage: str, values: dict[str, Tensor | tuple[Tensor, Tensor]], batch_size: int) -> None:
        """Log per-example values (or ``(value, weight)`` pairs) under TRL's metric names.

        Training logs each step's value over every rank's rows of that step (``rewards/chosen``, as TRL, without
        Lightning's ``_step``/``_epoch`` suffixes): the stage metric is reset, updated and computed, which syncs its
        sums and counts across ranks, so every rank must log the same names (an empty tensor counts as no rows).
        Validation and test update the stage metric and log the metric object, which Lightning computes exactly
        over the whole epoch (``eval_rewards/chosen``).
        """
        for name, value in values.items():
            metric = self.metrics.get(stage, name)
            args = tuple(
                a.detach().float() if torch.is_tensor(a) else a
                for a in (value if isinstance(value, tuple) else (value,))
            )
            log_name, prog_bar = self.metrics.log_name(stage, name), name in self.progress_bar_metrics
            if stage == "train":
                metric.reset()
                metric.update(*args)
                step_value = metric.compute()  # a collective under DDP/FSDP
                if torch.isfinite(step_value):  # NaN: no rows on any rank this step
                    self.log(log_name, step_value, on_step=True, on_epoch=False, prog_bar=prog_bar)
                continue
            if args[0].numel() == 0:
                continue
            metric.update(*args)
            self.log(log_name, metric, on_step=False, on_epoch=True, batch_size=batch_size, prog_bar=prog_bar)

    def log_this_step_only(self, values: dict[str, Tensor]) -> None:
        """Write a diagnostic measured on this step alone (e.g. every N steps) to the loggers at this step, from
        rank 0. Not through ``self.log``: Lightning keeps an on-step value and logs it again at every later step
        of the epoch, so a metric measured at steps 0 and 10 would read as measured at every step."""
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({name: float(value) for name, value in values.items()}, step=self.global_step)

    def log_optimizer_state(self) -> None:
        """TRL's ``grad_norm`` (the total gradient norm before clipping) and ``learning_rate`` of this step."""
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
            self.log("grad_norm", norm.detach().float(), on_step=True, on_epoch=False)
        optimizer = self.optimizers()
        self.log("learning_rate", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.automatic_optimization:  # manual optimization logs before it clips (manual_optimizer_step)
            self.log_optimizer_state()

    def on_validation_epoch_start(self) -> None:
        """Validate on a seed of its own (seed + global step), handing the training generators back afterwards."""
        self._rng_outside_validation = capture_rng_states()
        validation_seed(self.hparams.seed, self.global_step)

    def on_validation_epoch_end(self) -> None:
        """Log the sanity-check validation at step 0, so a reward-vs-drift trace starts before the first update.

        Lightning runs ``num_sanity_val_steps`` validation batches before training and then discards their
        metrics; set it to ``limit_val_batches`` for a starting point measured on the same batches.
        """
        if self._rng_outside_validation is not None:
            restore_rng_states(self._rng_outside_validation)
            self._rng_outside_validation = None
        if not self.trainer.sanity_checking or not self.loggers:
            return
        # compute() syncs across ranks; every rank calls it
        values = {name: float(metric.compute()) for name, metric in self.metrics.updated("val").items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=0)

    @property
    def num_ranks(self) -> int:
        """Processes in the run (the trainer's world size; 1 outside a Trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    def sum_across_ranks(self, tensor: Tensor) -> Tensor:
        """Sum a tensor over all ranks (a collective: every rank must call it); itself on one process."""
        if self.num_ranks == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="sum")

    def sum_and_count_across_ranks(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Σ ``values`` and how many there are, over every rank (one collective): a global mean is their ratio."""
        count = torch.tensor(float(values.numel()), device=values.device, dtype=values.dtype)
        totals = self.sum_across_ranks(torch.stack([values.sum(), count]))
        return totals[0], totals[1]

    def per_rank_share(self, count: Tensor) -> Tensor:
        """``count`` summed over all ranks, divided by the number of ranks: the divisor that turns a local sum into
        the global mean once DDP/FSDP average the ranks' gradients (a per-rank mean would weigh an item on a rank
        with fewer items more)."""
        return self.sum_across_ranks(count.detach()) / self.num_ranks

    def call_callbacks(self, hook: str) -> None:
        """Call ``hook(trainer, module)`` on every trainer callback that defines it: the two hooks Lightning lacks,
        ``on_configure_model`` and ``on_after_optimizer_step``, declared by ``callbacks.base.AlignmentCallback``."""
        if self._trainer is None:
            return
        for callback in self.trainer.callbacks:
            method = getattr(callback, hook, None)
            if callable(method):
                method(self.trainer, self)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.call_callbacks("on_after_optimizer_step")  # Lightning has no after-step callback hook

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # the first step after a resume continues the checkpoint's stream
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self._batch_index = batch.get(INDEX) if isinstance(batch, dict) else None

    def on_before_backward(self, loss: Tensor) -> None:
        if not torch.isfinite(loss).all():
            rows = self._batch_index.tolist() if self._batch_index is not None else "unknown"
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite loss ({loss.item()}) at global step {self.global_step} "
                f"on dataset rows {rows}; stopping. Lower the learning rate or check the data and the dtype."
            )

    # ---- what callbacks use (callbacks/base.py: AlignmentCallback) -----------------------------------------------

    policy_prefix: ClassVar[str] = "policy."  # a policy tensor's name in this module = prefix + its name in the model

    @property
    def reference_logps_precomputed(self) -> bool:
        """Whether reference log-probs are computed once before training instead of by a reference forward each
        step (the reference model is then freed): callbacks that read or rewrite the reference weights refuse it."""
        return False

    @classmethod
    def policy_tensor_name(cls, name: str) -> str | None:
        """The name in the policy model of this module's tensor ``name`` ("policy.model.x" → "model.x"); None for
        tensors that are not the policy's (a value head, a reference, callback weights)."""
        return name[len(cls.policy_prefix) :] if name.startswith(cls.policy_prefix) else None

    def trainable_named_parameters(self, include_extra: bool = False) -> dict[str, nn.Parameter]:
        """The policy's trainable weights (only the adapters under LoRA) by their name in this module, and with
        ``include_extra`` those of the other trainable modules (e.g. PPO's value head)."""
        modules = [self.policy, *(self.extra_trainable_modules() if include_extra else [])]
        wanted = {id(p) for module in modules for p in module.parameters() if p.requires_grad}
        return {name: p for name, p in self.named_parameters() if id(p) in wanted}

    def parameters_matching(self, pattern: str | None, option: str) -> list[nn.Parameter]:
        """Trainable parameters whose name in this module matches the regex ``pattern`` (all when None); a pattern
        that matches none is an error naming ``option``, the argument the user set it with."""
        chosen = [
            p
            for name, p in self.named_parameters()
            if p.requires_grad and (pattern is None or re.search(pattern, name))
        ]
        if not chosen:
            raise ValueError(f"{option}={pattern!r} matches no trainable parameter of {type(self).__name__}")
        return chosen

    def callback_weight_store(self, name: str, create: Callable[[], nn.Module]) -> nn.Module:
        """The submodule ``callback_weights[name]``, made by ``create()`` on the first call (models are configured
        once per fit, a restore comes after): weight snapshots kept there travel in this module's checkpoint,
        sharded like their parameters under FSDP2."""
        if name not in self.callback_weights:
            self.callback_weights[name] = create()
        return self.callback_weights[name]

    # ---- optimisation ---------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the policy's trainable weights and those of any extra trainable modules."""
        return list(self.trainable_named_parameters(include_extra=True).values())

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one training batch makes (1; PPO makes ppo_epochs × num_mini_batches)."""
        return 1

    def total_optimizer_steps(self) -> int:
        """Length of the learning-rate schedule: Lightning's estimate (in batches) times steps per batch,
        capped by ``max_steps`` (which counts optimizer steps)."""
        total = int(self.trainer.estimated_stepping_batches) * self.optimizer_steps_per_batch()
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            total = min(total, self.trainer.max_steps)
        return max(1, total)

    def uses_fused_adamw(self, params: list[Tensor]) -> bool:
        """Whether AdamW runs torch's fused kernel (one pass over each tensor; on a 2-core CPU it steps SmolLM2-135M
        in 0.06 s instead of 0.28 s, ``benchmarks/README.md``; torch's own default uses it on no device): when every
        parameter is on a CPU or CUDA device and no GradScaler (``16-mixed``) is in use, whose unscaling the fused
        step would take over and Lightning would then not clip."""
        plugin = self.trainer.precision_plugin if self._trainer is not None else None
        if getattr(plugin, "scaler", None) is not None:
            return False
        return bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES for p in params)

    def configure_optimizers(self):
        params = self.trainable_parameters()
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.adam_betas),
            eps=self.hparams.adam_epsilon,
            fused=self.uses_fused_adamw(params) or None,
        )
        if optimizer.defaults["fused"]:
            # No GradScaler runs here (see uses_fused_adamw), so the step unscales nothing; Lightning's mixed-precision
            # plugin refuses to clip gradients of any optimizer that says it does.
            optimizer._step_supports_amp_scaling = False
        total = self.total_optimizer_steps()
        warmup = self.hparams.warmup_steps or math.ceil(self.hparams.warmup_ratio * total)
        scheduler = get_scheduler(
            self.hparams.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints, resume, stopping (lit_align/checkpointing.py) --------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        return [FitGuard()]

    def rebuildable_state_keys(self) -> set[str]:
        """State-dict keys checkpoints leave out: ``configure_model`` rebuilds them from their source (the frozen
        reference unless a callback rewrites it; under LoRA the policy's frozen base weights)."""
        callbacks = self.trainer.callbacks if self._trainer is not None else []
        rewritten = any(getattr(callback, "writes_reference", False) for callback in callbacks)
        return rebuildable_state_keys(self.policy, self.reference, self.uses_lora, rewritten)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add every rank's generator states; leave out the weights ``configure_model`` rebuilds (FSDP2's
        sharded checkpoints keep everything)."""
        checkpoint[RNG_STATES_KEY] = gather_rng_states(self.num_ranks)
        checkpoint[MODULE_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.device_mesh is None and "state_dict" in checkpoint:
            for key in self.rebuildable_state_keys():
                checkpoint["state_dict"].pop(key, None)
        if self.hparams.export_every_checkpoint and self.hparams.export_dir:
            self.export(Path(self.hparams.export_dir) / f"step-{self.global_step}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Put back the rebuilt weights a checkpoint left out (so loading stays strict), and keep this rank's
        generator states for the next training step. Outside a Trainer (``load_from_checkpoint``) callbacks' weight
        snapshots have no callback to own them and are left out."""
        saved_class, my_class = checkpoint.get(MODULE_CLASS_KEY), f"{type(self).__module__}.{type(self).__qualname__}"
        if saved_class is not None and saved_class != my_class:
            raise ValueError(f"the checkpoint is a {saved_class} checkpoint; it cannot resume a {my_class}")
        state = checkpoint.get("state_dict")
        if state is not None and self._trainer is None:
            for key in [key for key in state if key.startswith("callback_weights.")]:
                del state[key]
            self.checkpoint_global_step = checkpoint.get("global_step")
            self.checkpoint_data = checkpoint.get("datamodule_hyper_parameters")
        if state is not None and self.policy is not None:
            current = self.state_dict()
            for key in self.rebuildable_state_keys() - state.keys():
                state[key] = current[key]
        states = checkpoint.get(RNG_STATES_KEY)
        if states is not None and len(states) == self.num_ranks:
            self._rng_to_restore = states[self.global_rank]
        elif states is not None:
            rank_zero_warn(
                f"the checkpoint holds random generator states of {len(states)} ranks, this run has {self.num_ranks}: "
                "sampling does not continue the interrupted run's random stream"
            )

    # ---- export ---------------------------------------------------------------------------------------------

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and not self.made_no_step:
            self.export(self.hparams.export_dir)

    def export(self, directory: str | Path, merge: bool = True) -> None:
        """Save the policy and tokenizer as a Hugging Face directory, with a model card (``lit_align/export.py``).

        Under LoRA the adapters are merged into the weights, or with ``merge=False`` saved as a peft adapter
        directory. Under FSDP2 the full state dict is gathered on every rank (a collective) and rank 0 writes it,
        without the duplicate of a tied ``lm_head.weight``.
        """
        directory = Path(directory)
        state = full_state_dict(self.policy)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        model = self.policy
        if self.uses_lora and merge:
            model = copy.deepcopy(model).merge_and_unload()
        if state is not None and getattr(model.config, "tie_word_embeddings", False):
            state = {name: tensor for name, tensor in state.items() if not name.endswith("lm_head.weight")}
        model.save_pretrained(directory, state_dict=state)
        self.tokenizer.save_pretrained(directory)
        data = self.trainer.datamodule if self._trainer is not None else self.checkpoint_data
        write_model_card(directory, self, logged_metrics(self), data)
        rank_zero_info(f"exported the policy to {directory}" + ("" if merge or not self.uses_lora else " (adapters)"))
