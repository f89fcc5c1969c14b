"""DPO vs DPO with pairwise-normalised gradients on real Anthropic HH pairs, watched by the
GradientEntanglementMonitor (Yuan et al. 2024), in one process.

Both runs: the same model, the same seeded batches of HH ``helpful-base`` pairs, AdamW with a constant lr, the
monitor every ``--every`` steps on the same probe of held-out pairs (exact full-parameter gradients). Reported:

* probe log π(y_w), log π(y_l), margin, ⟨g_w,g_l⟩/‖g_w‖², ⟨g_w,g_l⟩/‖g_l‖², cosine, condition failures at the first and
  last measurement of each run;
* the monitor's cost per call next to the mean training step time (its overhead);
* one PNG with both runs' curves.

Example (the numbers in the README and the issue note)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/gradient_entanglement.py \\
        --data ../shared/data/hh_rlhf --steps 30 --every 6
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from callbacks import GradientEntanglementMonitor
from callbacks.gradient_entanglement import plot_entanglement
from datamodules import HHDataModule
from lit_align import DPOModule


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_before_optimizer_step(self, *args) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def run(args: argparse.Namespace, normalize: bool, out: Path) -> dict:
    L.seed_everything(0)
    module = DPOModule(
        model=args.model,
        beta=args.beta,
        learning_rate=args.lr,
        lr_scheduler="constant",
        normalize_pair_gradients=normalize,
    )
    data = HHDataModule(
        data_path=args.data,
        subsets=["helpful-base"],
        train_split="test",
        val_split=None,
        holdout=args.probe,
        limit_train=args.steps * args.batch_size,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        shuffle=False,
    )
    name = "dpo_normalized" if normalize else "dpo"
    monitor = GradientEntanglementMonitor(
        every_n_steps=args.every, num_pairs=args.probe, output_dir=str(out / name), plot=True
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[monitor, timer],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    monitor_seconds = [entry["seconds"] for entry in monitor.history]
    return {
        "history": monitor.history,
        "wall_seconds": time.perf_counter() - start,
        "train_step_seconds": statistics.mean(timer.seconds[1:]),
        "monitor_seconds_per_call": statistics.mean(monitor_seconds[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/hh_rlhf")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--probe", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--max-prompt-length", type=int, default=96)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"settings": vars(args)}
    for normalize in (False, True):
        results["dpo_normalized" if normalize else "dpo"] = run(args, normalize, out)
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    plot = plot_entanglement(
        {"DPO": results["dpo"]["history"], "DPO + normalized": results["dpo_normalized"]["history"]},
        out / "gradient_entanglement.png",
    )
    (out / "gradient_entanglement.json").write_text(json.dumps(results, indent=1))
    keys = ("logps_chosen", "logps_rejected", "ratio_chosen", "ratio_rejected", "cosine", "condition_failed")
    print(f"{'run':<16}{'step':>6}" + "".join(f"{k:>18}" for k in keys))
    for name in ("dpo", "dpo_normalized"):
        for entry in (results[name]["history"][0], results[name]["history"][-1]):
            print(f"{name:<16}{entry['step']:>6}" + "".join(f"{entry[k]:>18.4f}" for k in keys))
        run_ = results[name]
        print(
            f"  train step {run_['train_step_seconds']:.2f} s, monitor call {run_['monitor_seconds_per_call']:.2f} s, "
            f"wall {run_['wall_seconds']:.0f} s"
        )
    print(f"peak RSS {results['peak_rss_gb']:.1f} GB; plot: {plot}")


if __name__ == "__main__":
    main()
