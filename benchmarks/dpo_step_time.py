"""Time per optimizer step of DPO: a bare PyTorch loop vs lit-align (Lightning) vs TRL, in one process.

All three run DPO (sigmoid loss, β, full fine-tune, AdamW with the same lr / betas / eps, no weight decay, constant
lr, no gradient clipping, fp32, dropout off) on the same model weights and the same batches of HH preference pairs:

1. ``bare``: hand-written loop. Batches are tokenized and collated once, before timing, by the same
   ``HHDataModule`` (same seeded order as lit-align's train loader). Each step: concatenated chosen+rejected
   policy forward, reference forward under ``no_grad``, DPO loss, backward, ``AdamW.step``.
2. ``lit-align``: ``lit_align.DPOModule`` + ``datamodules.HHDataModule`` through ``lightning.Trainer.fit`` (logger,
   checkpointing, progress bar, model summary and validation off), timed by a ``Callback``
   (``on_train_batch_start`` -> ``on_train_batch_end``).
3. ``trl``: ``trl.DPOTrainer`` (skipped with a note if TRL cannot be imported), timed by a ``TrainerCallback``
   (``on_step_begin`` -> ``on_step_end``). It gets a ``datasets.Dataset`` of ``prompt/chosen/rejected`` strings
   holding the same records, in the order of the batches above, read with a sequential sampler. TRL has no
   prompt-length limit, so by default its prompts are lit-align's *truncated* prompts decoded back to text
   (``--trl-prompts truncated``); the script counts how many token sequences TRL ends up with that are identical
   to lit-align's.

Two times per step are reported: ``step`` (inside the hooks above: forward, backward, optimizer step) and
``interval`` (from one step's end to the next one's: also data loading, collation and framework bookkeeping).
The first ``--warmup-steps`` steps are not timed. Step-0 losses must all be ln 2 (policy == reference).

Example (see benchmarks/README.md)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/dpo_step_time.py --model tiny-llama \\
        --steps 6 --warmup-steps 2 --pairs 32 --batch-size 4 --max-length 128 --max-prompt-length 64
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timing import quiet_trainer, trl_settings
from torch import Tensor, nn

IMPLEMENTATIONS = ("bare", "lit-align", "trl")
LN2 = math.log(2.0)


# ---- helpers ------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def summarize(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "mean": None, "min": None, "max": None, "stdev": None}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def timed_stats(starts: list[float], ends: list[float], warmup: int) -> dict[str, Any]:
    """Per-step times after ``warmup`` steps: hook-to-hook durations and end-to-end intervals."""
    steps = [end - start for start, end in zip(starts, ends, strict=True)][warmup:]
    intervals = [ends[i] - ends[i - 1] for i in range(max(1, warmup), len(ends))]
    return {"step_s": steps, "interval_s": intervals, "step": summarize(steps), "interval": summarize(intervals)}


def autocast(args: argparse.Namespace):
    """bf16 autocast for ``--precision bf16-mixed`` (what Lightning's and accelerate's bf16 mixed precision do)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")


def set_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def free_memory() -> None:
    gc.collect()


def make_datamodule(args: argparse.Namespace):
    from datamodules import HHDataModule

    return HHDataModule(
        data_path=args.data,
        subsets=[args.subset],
        train_split=args.split,
        val_split=None,
        holdout=0,
        limit_train=args.pairs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        num_workers=0,
        seed=args.seed,
        group_by_length=args.group_by_length,
    )


def planned_batches(args: argparse.Namespace, tokenizer) -> tuple[Any, list[dict]]:
    """The batches lit-align's train loader yields, in order, for ``warmup + steps`` optimizer steps.

    Built by a DataModule configured like the one lit-align gets (same seed, so the same shuffled order), iterating
    one loader object across epochs exactly as Lightning does.
    """
    datamodule = make_datamodule(args).configure(tokenizer=tokenizer, mode="pair")
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    total = args.warmup_steps + args.steps
    batches: list[dict] = []
    while len(batches) < total:
        for batch in loader:
            batches.append(batch)
            if len(batches) == total:
                break
    return datamodule, batches


def concatenated(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(
        torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], dim=0)
        for key in ("input_ids", "attention_mask", "completion_mask")
    )


# ---- 1. bare PyTorch --------------------------------------------------------------------------------------------


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """Σ over completion tokens of log π(y_t | x, y_<t); full logits, gather − logsumexp."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    labels = input_ids[:, 1:]
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def run_bare(args: argparse.Namespace, batches: list[dict]) -> dict[str, Any]:
    from lit_align.models import load_causal_lm

    set_determinism(args.seed, args.threads)
    policy = load_causal_lm(args.model, seed=0).train()
    reference = load_causal_lm(args.model, args.reference_dtype, seed=0).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in policy.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True
    )
    starts, ends, losses, widths = [], [], [], []
    first_logps: dict[str, list[float]] = {}
    threads = None
    for step, batch in enumerate(batches):
        if step == 0:
            threads = torch.get_num_threads()
        start = time.perf_counter()
        input_ids, attention_mask, completion_mask = concatenated(batch)
        with autocast(args):
            policy_logps = sequence_logps(policy, input_ids, attention_mask, completion_mask)
            with torch.no_grad():
                ref_logps = sequence_logps(reference, input_ids, attention_mask, completion_mask)
        policy_chosen, policy_rejected = policy_logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        logits = args.beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
        loss = -F.logsigmoid(logits).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
        starts.append(start)
        losses.append(loss.detach())
        widths.append(input_ids.shape[1])
        if step == 0:
            first_logps = {
                "policy_chosen": policy_chosen.detach().tolist(),
                "policy_rejected": policy_rejected.detach().tolist(),
                "ref_chosen": ref_chosen.tolist(),
                "ref_rejected": ref_rejected.tolist(),
            }
    result = {
        **timed_stats(starts, ends, args.warmup_steps),
        "losses": [float(v) for v in losses],
        "padded_width": widths,
        "first_step_logps": first_logps,
        "threads": threads,
    }
    del policy, reference, optimizer
    return result


# ---- 2. lit-align -------------------------------------------------------------------------------------------------


def first_step_logps(module, batch: dict) -> dict[str, list[float]]:
    """What the DPO module's first training step computes on ``batch``: the policy's and the reference's sequence
    log-probs of chosen and rejected, through its public ``forward_pair`` / ``reference_pair`` (the two calls its
    ``shared_step`` makes). Called from ``on_train_batch_start`` of step 0, before the step is timed and before any
    update, so the weights are the ones step 0 sees; dropout is off, so the values are the step's own."""
    with torch.no_grad():
        chosen, rejected = module.forward_pair(batch)
        ref_chosen, ref_rejected = module.reference_pair(batch, "train")
    return {
        "policy_chosen": chosen.logps.tolist(),
        "policy_rejected": rejected.logps.tolist(),
        "ref_chosen": ref_chosen.tolist(),
        "ref_rejected": ref_rejected.tolist(),
    }


def run_lit_align(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from lit_align import DPOModule

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.losses: list[Tensor] = []
            self.indices: list[list[int]] = []
            self.widths: list[int] = []
            self.threads: int | None = None
            self.first_logps: dict[str, list[float]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.indices.append(batch["index"].tolist())
            self.widths.append(batch["chosen_input_ids"].shape[1])
            if not self.starts:  # step 0: recorded before its timer starts
                self.threads = torch.get_num_threads()
                self.first_logps = first_step_logps(pl_module, batch)
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.losses.append(outputs["loss"].detach())

    set_determinism(args.seed, args.threads)
    module = DPOModule(
        model=args.model,
        beta=args.beta,
        loss_type="sigmoid",
        learning_rate=args.lr,
        weight_decay=0.0,
        adam_betas=(0.9, 0.999),
        lr_scheduler="constant",
        disable_dropout=True,
        reference_dtype=args.reference_dtype,
        logprob_chunk_size=args.chunk,
        gradient_checkpointing=args.gradient_checkpointing,
        compile_layers=args.compile,
        seed=0,
    )
    datamodule = make_datamodule(args)
    timer = StepTimer()
    trainer = quiet_trainer(args.precision, args.warmup_steps + args.steps, [timer])
    trainer.fit(module, datamodule=datamodule)
    result = {
        **timed_stats(timer.starts, timer.ends, args.warmup_steps),
        "losses": [float(v) for v in timer.losses],
        "padded_width": timer.widths,
        "batch_indices": timer.indices,
        "first_step_logps": timer.first_logps,
        "threads": timer.threads,
    }
    return result


# ---- 3. TRL -------------------------------------------------------------------------------------------------------


def trl_records(args: argparse.Namespace, datamodule, batches: list[dict], tokenizer) -> list[dict[str, str]]:
    """One ``{prompt, chosen, rejected}`` string record per row, in batch order (rows repeat across epochs)."""
    data = datamodule.dataset("train")
    rows = []
    for batch in batches:
        for index in batch["index"].tolist():
            record = data.records[index]
            if args.trl_prompts == "truncated":
                prompt = tokenizer.decode(data[index]["prompt_ids"])
            else:
                prompt = record["prompt"]
            rows.append({"prompt": prompt, "chosen": record["chosen"], "rejected": record["rejected"]})
    return rows


def token_parity(args: argparse.Namespace, trl_dataset, datamodule, batches: list[dict]) -> dict[str, Any]:
    """How many of TRL's tokenized rows equal lit-align's (same ids after truncation, same prompt/completion cut)."""
    data = datamodule.dataset("train")
    order = [i for batch in batches for i in batch["index"].tolist()]
    if len(trl_dataset) != len(order):
        return {"rows": len(order), "trl_rows": len(trl_dataset), "note": "TRL dropped rows; no row-wise comparison"}
    same = {"chosen": 0, "rejected": 0, "prompt": 0}
    examples = []
    for row, index in enumerate(order):
        ours, theirs = data[index], trl_dataset[row]
        same["prompt"] += theirs["prompt_ids"] == ours["prompt_ids"]
        for side in ("chosen", "rejected"):
            mine = ours["prompt_ids"] + ours[f"{side}_ids"]
            trls = (theirs["prompt_ids"] + theirs[f"{side}_ids"])[: args.max_length]
            equal = mine == trls and len(theirs["prompt_ids"]) == len(ours["prompt_ids"])
            same[side] += equal
            if not equal and len(examples) < 3:
                examples.append({"row": index, "side": side, "lit_align_len": len(mine), "trl_len": len(trls)})
    return {"rows": len(order), **{f"identical_{k}": v for k, v in same.items()}, "mismatch_examples": examples}


def run_trl(args: argparse.Namespace, datamodule, batches: list[dict]) -> dict[str, Any]:
    try:
        import datasets
        import trl
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except Exception as err:  # noqa: BLE001 — any import failure means "skip TRL", reported
        return {"skipped": f"TRL could not be imported ({type(err).__name__}: {err}); pip install 'trl>=1.0'"}

    from lit_align.models import load_causal_lm, load_tokenizer

    class TRLStepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.threads: int | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.threads is None:
                self.threads = torch.get_num_threads()
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    class RecordingDPOTrainer(DPOTrainer):
        """Keeps each step's loss (detached, no sync) and the first step's mean log-probs."""

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.recorded_losses: list[Tensor] = []
            self.recorded_widths: list[int] = []
            self.first_metrics: dict[str, float] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            loss = out[0] if return_outputs else out
            self.recorded_losses.append(loss.detach())
            self.recorded_widths.append(inputs["input_ids"].shape[1])
            if not self.first_metrics:
                metrics = self._metrics["train"]
                self.first_metrics = {k: metrics[k][-1] for k in ("logps/chosen", "logps/rejected") if metrics[k]}
            return out

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(args.model)
    rows = trl_records(args, datamodule, batches, tokenizer)
    dataset = datasets.Dataset.from_list(rows)
    steps = args.warmup_steps + args.steps
    wanted = dict(
        **trl_settings("dpo_step_time", steps, args.lr, 0.0, args.precision, args.gradient_checkpointing, args.seed),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,  # only in TRL versions that have it (not 1.x)
        truncation_mode="keep_start",
        fp16=False,
        eval_strategy="no",
        dataloader_pin_memory=False,
        train_sampling_strategy="sequential",
        precompute_ref_log_probs=False,
        data_seed=args.seed,
    )
    wanted["logging_steps"] = steps  # only the last step: TRL's per-step logging is part of what it costs
    fields = DPOConfig.__dataclass_fields__
    ignored = sorted(k for k in wanted if k not in fields)
    config = DPOConfig(**{k: v for k, v in wanted.items() if k in fields})

    set_determinism(args.seed, args.threads)
    policy = load_causal_lm(args.model, seed=0)
    reference = load_causal_lm(args.model, args.reference_dtype, seed=0)
    timer = TRLStepTimer()
    trainer = RecordingDPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    parity = token_parity(args, trainer.train_dataset, datamodule, batches)
    set_determinism(args.seed, args.threads)
    trainer.train()
    result = {
        **timed_stats(timer.starts, timer.ends, args.warmup_steps),
        "losses": [float(v) for v in trainer.recorded_losses],
        "padded_width": trainer.recorded_widths,
        "first_step_mean_logps": trainer.first_metrics,
        "token_parity_with_lit_align": parity,
        "config_fields_not_in_this_trl": ignored,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "threads": timer.threads,
        "version": trl.__version__,
    }
    del trainer, policy, reference
    return result


# ---- report -------------------------------------------------------------------------------------------------------


def matmul_parameters(model_name: str) -> int:
    """Weights that take part in a matmul per token: every ``nn.Linear`` (the output layer included, tied or not)."""
    from lit_align.models import load_causal_lm

    model = load_causal_lm(model_name, seed=0)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def add_throughput(args: argparse.Namespace, results: dict[str, dict], batches: list[dict]) -> None:
    """Real (non-pad) tokens per second over the timed steps, and MFU against ``peak.py``'s measured peak.

    Model FLOPs per real token: 8 × matmul weights (forward + backward of the policy, 6N; the reference forward,
    2N), the usual dense-transformer count; attention scores and recomputation under checkpointing are left out.
    """
    real = [int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum()) for b in batches]
    timed_tokens = real[args.warmup_steps :]
    flops_per_token = 8 * matmul_parameters(args.model)
    peaks = {}
    if Path(args.peak).is_file():
        measured = json.loads(Path(args.peak).read_text())["gflops"]
        peaks = {dtype: measured[dtype]["peak"] * 1e9 for dtype in ("float32", "bfloat16") if dtype in measured}
    dtype = "bfloat16" if args.precision == "bf16-mixed" else "float32"
    for res in results.values():
        if "skipped" in res or not res["step_s"]:
            continue
        seconds = sum(res["step_s"])
        tokens = sum(timed_tokens[: len(res["step_s"])])
        achieved = flops_per_token * tokens / seconds
        res["real_tokens_per_s"] = tokens / seconds
        res["model_tflops_per_s"] = achieved / 1e12
        res["mfu"] = {name: achieved / peak for name, peak in peaks.items()}
        res["mfu_of_precision_peak"] = res["mfu"].get(dtype)


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or "skipped" in a or "skipped" in b:
        return None
    x, y = a[key]["median"], b[key]["median"]
    return None if x is None or not y else x / y


def fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def report(args: argparse.Namespace, results: dict[str, dict], env: dict) -> dict[str, Any]:
    bare, lit, trl_ = (results.get(k) for k in IMPLEMENTATIONS)
    ratios = {
        f"{num}/{den}": {
            "step": ratio(results.get(num), results.get(den), "step"),
            "interval": ratio(results.get(num), results.get(den), "interval"),
        }
        for num, den in (("lit-align", "bare"), ("trl", "bare"), ("lit-align", "trl"))
    }
    print()
    print(
        f"### DPO step time — {args.model}, {args.precision}, reference {args.reference_dtype}, chunk {args.chunk}, "
        f"checkpointing {args.gradient_checkpointing}, grouped {args.group_by_length}, "
        f"B={args.batch_size} pairs, max_length={args.max_length}, "
        f"max_prompt_length={args.max_prompt_length}, {args.steps} timed steps after {args.warmup_steps} warm-up, "
        f"{args.threads} threads"
    )
    print()
    print(
        "| implementation | median s/step | mean s/step | median interval s | mean padded width | step-0 loss "
        "| peak RSS after (MB) | real tokens/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in IMPLEMENTATIONS:
        res = results.get(name)
        if res is None:
            continue
        if "skipped" in res:
            print(f"| {name} | skipped: {res['skipped']} | | | | | | | |")
            continue
        width = statistics.fmean(res["padded_width"]) if res["padded_width"] else None
        loss0 = res["losses"][0] if res["losses"] else None
        print(
            f"| {name} | {fmt(res['step']['median'])} | {fmt(res['step']['mean'])} | "
            f"{fmt(res['interval']['median'])} | {fmt(width, 1)} | {fmt(loss0, 6)} | {res['peak_rss_mb']:.0f} | "
            f"{fmt(res.get('real_tokens_per_s'), 1)} | {fmt(res.get('mfu_of_precision_peak'), 3)} |"
        )
    print()
    print("| ratio (median) | step | interval |")
    print("|---|---|---|")
    for name, r in ratios.items():
        print(f"| {name} | {fmt(r['step'], 3)} | {fmt(r['interval'], 3)} |")
    print()

    parity: dict[str, Any] = {"ln2": LN2}
    for name in IMPLEMENTATIONS:
        res = results.get(name)
        if res and "skipped" not in res and res["losses"]:
            parity[f"{name}_step0_loss"] = res["losses"][0]
            parity[f"{name}_losses"] = res["losses"]
    line = ", ".join(f"{n}={parity[f'{n}_step0_loss']:.6f}" for n in IMPLEMENTATIONS if f"{n}_step0_loss" in parity)
    print(f"Correctness parity: step-0 loss (must be ln 2 = {LN2:.6f}): {line}")
    if bare and lit and "skipped" not in lit and lit.get("first_step_logps") and bare.get("first_step_logps"):
        same_batches = lit["batch_indices"] == env["planned_indices"][: len(lit["batch_indices"])]
        diffs = {
            key: max(
                abs(x - y) for x, y in zip(bare["first_step_logps"][key], lit["first_step_logps"][key], strict=True)
            )
            for key in bare["first_step_logps"]
        }
        parity["bare_vs_lit_align_same_batches"] = same_batches
        parity["bare_vs_lit_align_first_step_logps_max_abs_diff"] = diffs
        print(
            f"  bare vs lit-align: same batches in the same order: {same_batches}; first-step sequence log-probs, "
            f"max |diff|: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items())
        )
    if trl_ and "skipped" not in trl_ and bare:
        mean = {side: statistics.fmean(bare["first_step_logps"][f"policy_{side}"]) for side in ("chosen", "rejected")}
        theirs = trl_.get("first_step_mean_logps", {})
        parity["trl_vs_bare_first_step_mean_logps"] = {
            side: {"bare": mean[side], "trl": theirs.get(f"logps/{side}")} for side in mean
        }
        print(
            "  TRL vs bare, first-step batch-mean policy log-probs: "
            + ", ".join(f"{side} bare={mean[side]:.4f} trl={fmt(theirs.get(f'logps/{side}'))}" for side in mean)
        )
        tp = trl_["token_parity_with_lit_align"]
        if "identical_chosen" in tp:
            print(
                f"  TRL tokenization vs lit-align ({args.trl_prompts} prompts): identical prompt ids "
                f"{tp['identical_prompt']}/{tp['rows']}, identical prompt+chosen {tp['identical_chosen']}/"
                f"{tp['rows']}, identical prompt+rejected {tp['identical_rejected']}/{tp['rows']}"
            )
        else:
            print(f"  TRL tokenization vs lit-align: {tp}")
    for name in IMPLEMENTATIONS:
        res = results.get(name)
        if res and "skipped" not in res:
            print(f"  {name}: losses per step: " + ", ".join(f"{v:.5f}" for v in res["losses"]))
    print()
    print("Peak RSS is the process-wide ru_maxrss after each phase (all three run in one process, in this order),")
    print("so only the first phase's value is its own; run with --only NAME for an isolated figure.")
    print(
        f"Load average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']} "
        f"on {env['cpu_count']} CPUs."
    )
    return {"ratios_median": ratios, "parity": parity}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama (default) or smollm2-135m-instruct")
    parser.add_argument("--data", default="../shared/data/hh_rlhf", help="HH-RLHF: local copy or Hub id")
    parser.add_argument("--subset", default="helpful-base")
    parser.add_argument("--split", default="test")
    parser.add_argument("--pairs", type=int, default=64, help="number of HH pairs (rows are reused across epochs)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps before the timed ones")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current value)")
    parser.add_argument(
        "--only", default=",".join(IMPLEMENTATIONS), help="comma-separated subset of " + ", ".join(IMPLEMENTATIONS)
    )
    parser.add_argument(
        "--trl-prompts",
        choices=("truncated", "full"),
        default="truncated",
        help="TRL prompts: lit-align's tail-truncated prompt tokens decoded to text (default), or "
        "the full prompt text (TRL 1.x then only truncates prompt+completion to --max-length)",
    )
    parser.add_argument(
        "--precision",
        choices=("32-true", "bf16-mixed"),
        default="32-true",
        help="all three: fp32, or bf16 autocast over fp32 weights (Lightning's bf16-mixed, TRL's bf16=True)",
    )
    parser.add_argument("--reference-dtype", default="float32", help="dtype the frozen reference is held in")
    parser.add_argument("--chunk", type=int, default=None, help="lit-align's logprob_chunk_size (default: off)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="all three")
    parser.add_argument("--compile", action="store_true", help="lit-align's compile_layers (torch.compile per layer)")
    parser.add_argument(
        "--group-by-length", action="store_true", help="length-grouped batches (the same batches for all three)"
    )
    parser.add_argument("--peak", default="benchmarks/results/peak.json", help="peak.py's output, for MFU")
    parser.add_argument("--out", default="benchmarks/results/dpo_step_time.json")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'concurrent job running')")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"--only: unknown implementation(s) {unknown}; choose from {IMPLEMENTATIONS}")
    if args.pairs % args.batch_size:
        parser.error("--pairs must be a multiple of --batch-size (so every batch is full and TRL's batches align)")
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("--steps must be >= 1 and --warmup-steps >= 0")
    if args.threads is None:
        args.threads = torch.get_num_threads()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning
    import transformers

    from lit_align.models import load_tokenizer

    transformers.logging.set_verbosity_error()
    set_determinism(args.seed, args.threads)
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    tokenizer = load_tokenizer(args.model)
    datamodule, batches = planned_batches(args, tokenizer)
    env["planned_indices"] = [b["index"].tolist() for b in batches]
    env["truncation_stats"] = datamodule.truncation_stats

    results: dict[str, dict] = {}
    for name in IMPLEMENTATIONS:
        if name not in args.only:
            continue
        print(f"--- running {name} ...", flush=True)
        began = time.perf_counter()
        if name == "bare":
            res = run_bare(args, batches)
        elif name == "lit-align":
            res = run_lit_align(args)
        else:
            res = run_trl(args, datamodule, batches)
            if "skipped" in res:
                print(f"NOTE: skipping TRL: {res['skipped']}", flush=True)
        free_memory()
        res["peak_rss_mb"] = peak_rss_mb()
        res["wall_s_including_setup"] = time.perf_counter() - began
        res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        results[name] = res
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    add_throughput(args, results, batches)
    summary = report(args, results, env)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {k: v for k, v in vars(args).items()},
        "environment": env,
        "results": results,
        **summary,
        "notes": {
            "step": "hook-to-hook time of one optimizer step (forward, backward, optimizer step); warm-up excluded",
            "interval": "end of one step to the end of the next (adds data loading, collation, bookkeeping)",
            "peak_rss_mb": "process-wide ru_maxrss after each phase; phases run in one process in order",
        },
    }
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
