"""Time per KTO optimizer step: lit-align's ``KTOModule`` vs TRL's ``KTOTrainer``, each in its own process.

    python benchmarks/kto_step_time.py --only lit-align [--precision bf16-mixed] [--gradient-checkpointing] ...
    python benchmarks/kto_step_time.py --only trl [--precision bf16-mixed] [--gradient-checkpointing] ...

Both train the embedded SmolLM2-135M-Instruct on the same unpaired HH rows (``HHDataModule`` in ``unpaired`` mode:
each pair gives a desirable and an undesirable row) in the same order: lit-align's train loader order, handed to TRL
as a sequential dataset of ``prompt`` (lit-align's tail-truncated prompt tokens decoded back to text, as in
``dpo_step_time.py``), ``completion`` and ``label``. Same settings: β 0.1, desirable/undesirable weights 1, the
KL reference point from mismatched completions within the batch (both shift completions by one row), full
fine-tune, AdamW lr 5e-6 constant, no clipping, dropout off, ``--batch-size`` rows, ``--max-length``. Timed from the
start to the end of each optimizer step (lit-align: a Callback's ``on_train_batch_start`` → ``on_train_batch_end``;
TRL: ``on_step_begin`` → ``on_step_end``); reported: the median after ``--warmup-steps``, real (non-pad) tokens/s
of the policy's rows, the process's peak RSS and the loss of every step (step 0 must be 0.5 for both: policy ==
reference, so every reward and the reference point are 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from timing import StepTimer, peak_rss_gb, quiet_trainer, trl_settings, trl_step_timer

MODEL = "smollm2-135m-instruct"


def make_datamodule(args: argparse.Namespace):
    from datamodules import HHDataModule

    return HHDataModule(
        data_path=args.data,
        subsets=["helpful-base"],
        train_split="test",
        val_split=None,
        holdout=0,
        limit_train=args.pairs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        group_by_length=args.group_by_length,
        seed=args.seed,
    )


def planned_batches(args: argparse.Namespace) -> tuple[Any, list[dict]]:
    """lit-align's train batches, in order, for ``warmup + steps`` steps (one loader iterated across epochs)."""
    from lit_align.models import load_tokenizer

    datamodule = make_datamodule(args).configure(load_tokenizer(MODEL), mode="unpaired")
    datamodule.setup("fit")
    loader, batches = datamodule.train_dataloader(), []
    while len(batches) < args.warmup_steps + args.steps:
        for batch in loader:
            batches.append(batch)
            if len(batches) == args.warmup_steps + args.steps:
                break
    return datamodule, batches


def run_lit_align(args: argparse.Namespace) -> dict[str, Any]:
    from lit_align import KTOModule

    torch.manual_seed(args.seed)
    module = KTOModule(
        model=MODEL,
        beta=0.1,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler="constant",
        disable_dropout=True,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    timer = StepTimer()
    trainer = quiet_trainer(args.precision, args.warmup_steps + args.steps, [timer])
    trainer.fit(module, datamodule=make_datamodule(args))
    return {"starts": timer.starts, "ends": timer.ends, "losses": timer.losses}


def run_trl(args: argparse.Namespace, datamodule, batches: list[dict]) -> dict[str, Any]:
    try:
        import datasets
        from trl import KTOConfig, KTOTrainer
    except Exception as err:  # noqa: BLE001 — any import failure means "skip TRL", reported
        return {"skipped": f"TRL could not be imported ({type(err).__name__}: {err}); pip install 'trl>=1.0'"}

    from lit_align.models import load_causal_lm, load_tokenizer

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(MODEL)
    data = datamodule.dataset("train")
    rows = []
    for batch in batches:
        for index in batch["index"].tolist():
            record = data.records[index]
            prompt = tokenizer.decode(data[index]["prompt_ids"])
            rows.append({"prompt": prompt, "completion": record["completion"], "label": bool(record["label"])})
    steps = args.warmup_steps + args.steps
    config = KTOConfig(
        **trl_settings("kto_step_time", steps, args.lr, 0.0, args.precision, args.gradient_checkpointing, args.seed),
        per_device_train_batch_size=args.batch_size,
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.0,
        max_length=args.max_length,
        train_sampling_strategy="sequential",
    )
    timer = trl_step_timer()
    torch.manual_seed(args.seed)
    trainer = KTOTrainer(
        model=load_causal_lm(MODEL),
        ref_model=load_causal_lm(MODEL),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return {"starts": timer.starts, "ends": timer.ends, "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("lit-align", "trl"), required=True)
    parser.add_argument("--data", default="../shared/data/hh_rlhf")
    parser.add_argument("--pairs", type=int, default=24, help="HH pairs (2 unpaired rows each)")
    parser.add_argument("--batch-size", type=int, default=8, help="unpaired rows per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    datamodule, batches = planned_batches(args)
    if args.only == "lit-align":
        result = run_lit_align(args)
    else:
        result = run_trl(args, datamodule, batches)
    if "skipped" in result:
        print(result["skipped"])
        return 0
    seconds = [end - start for start, end in zip(result["starts"], result["ends"], strict=True)]
    timed = seconds[args.warmup_steps :]
    real = [int(b["attention_mask"].sum()) for b in batches][args.warmup_steps :]
    summary = {
        "median_s": statistics.median(timed),
        "real_tokens_per_s": sum(real[: len(timed)]) / sum(timed),
        "peak_rss_gb": peak_rss_gb(),
        "losses": result["losses"],
        "step_s": seconds,
        "config": vars(args),
        "torch": torch.__version__,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "step_s"}, indent=1))
    tag = f"{args.only}_{args.precision}{'_gc' if args.gradient_checkpointing else ''}"
    out = Path(args.out or f"benchmarks/results/kto_step_time_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
