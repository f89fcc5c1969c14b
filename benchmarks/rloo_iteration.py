"""Time per RLOO iteration (sample, score, reference/old log-probs, update): lit-align's main job vs TRL's
``RLOOTrainer``, at equal settings, each implementation in its own process.

    python benchmarks/rloo_iteration.py --only lit-align [--precision bf16-mixed] [--iterations 6 --warmup 2]
    python benchmarks/rloo_iteration.py --only trl [--precision bf16-mixed]

Settings of ``configs/imdb/ppo.yaml`` (the main job): the embedded SmolLM2-135M-Instruct, the shipped IMDB openers
(the same prompts in the same order for both: lit-align's train loader order, handed to TRL as a sequential
dataset of plain-text prompts), 4 prompts × k = 4 samples, up to 32 new tokens at temperature 1 (stop at EOS),
offline VADER reward on the completion, KL coefficient 0.05 to the frozen initial policy, one optimizer step per
rollout (one epoch, one minibatch), AdamW lr 6e-5 constant, gradient clipping 1.0, dropout off. Each
implementation's iteration is timed from the start to the end of the training step that samples and updates
(lit-align: a Callback's ``on_train_batch_start`` → ``on_train_batch_end``; TRL: ``on_step_begin`` →
``on_step_end``, whose step includes its generation). Reported: median seconds per iteration after ``--warmup``,
the peak RSS of the process, the mean completion length and mean reward of the timed iterations (both sample the
same distribution, so these must agree in expectation, not per iteration).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from timing import StepTimer, peak_rss_gb, quiet_trainer, trl_settings, trl_step_timer

PROMPTS, K, NEW_TOKENS, KL, GRPO_BETA, LR = 4, 4, 32, 0.05, 0.04, 6e-5


def openers(count: int, seed: int) -> list[str]:
    """The prompts of lit-align's first ``count`` training rollouts, in its train loader's order."""
    from datamodules import IMDBDataModule
    from lit_align.models import load_tokenizer

    data = IMDBDataModule(batch_size=PROMPTS, seed=seed).configure(load_tokenizer("smollm2-135m-instruct"), "prompt")
    data.setup("fit")
    prompts: list[str] = []
    loader = data.train_dataloader()
    while len(prompts) < count:
        for batch in loader:
            prompts += list(batch["prompt"])
            if len(prompts) >= count:
                break
    return prompts[:count]


def run_lit_align(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from datamodules import IMDBDataModule
    from lit_align import GRPOModule, PPOModule
    from lit_align.rewards import LexiconSentimentReward

    class Timer(StepTimer):
        def __init__(self) -> None:
            super().__init__()
            self.lengths: list[float] = []
            self.rewards: list[float] = []
            self.phases: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            logged = trainer.callback_metrics
            self.lengths.append(float(logged.get("completions/mean_length", float("nan"))))
            self.rewards.append(float(logged.get("objective/scores", logged.get("reward", float("nan")))))
            self.phases.append({k: float(v) for k, v in logged.items() if k.startswith("time/")})

    L.seed_everything(args.seed)
    shared = dict(
        model="smollm2-135m-instruct",
        sampling={"max_new_tokens": NEW_TOKENS, "temperature": 1.0},
        learning_rate=LR,
        lr_scheduler="constant",
        max_grad_norm=1.0,
        drift_texts=0,
        gradient_checkpointing=args.gradient_checkpointing,
        compile_layers=args.compile,
        reference_dtype=args.reference_dtype,
    )
    if args.algorithm == "grpo":  # configs/imdb/grpo.yaml
        module = GRPOModule(
            reward_funcs=[LexiconSentimentReward(text="completion")],
            beta=GRPO_BETA,
            num_generations=K,
            scale_rewards=True,
            loss_type="grpo",
            epsilon=0.2,
            num_iterations=1,
            num_mini_batches=1,
            **shared,
        )
    else:  # configs/imdb/ppo.yaml
        module = PPOModule(
            reward=LexiconSentimentReward(text="completion"),
            advantage_estimator="rloo",
            samples_per_prompt=K,
            kl_coef=KL,
            kl_estimator="k1",
            ppo_epochs=1,
            num_mini_batches=1,
            **shared,
        )
    timer = Timer()
    trainer = quiet_trainer(args.precision, args.warmup + args.iterations, [timer])
    trainer.fit(module, datamodule=IMDBDataModule(batch_size=PROMPTS, seed=args.seed))
    result = summary(timer.starts, timer.ends, timer.lengths, timer.rewards, args.warmup)
    timed = timer.phases[args.warmup :]
    result["phase_median_s"] = {k: statistics.median(p[k] for p in timed) for k in timed[0]} if timed else {}
    return result


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import datasets
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
    except Exception as err:  # noqa: BLE001 — any import failure means "skip TRL", reported
        return {"skipped": f"TRL could not be imported ({type(err).__name__}: {err}); pip install 'trl>=1.0'"}

    from lit_align.models import load_causal_lm, load_tokenizer
    from lit_align.rewards import LexiconSentimentReward

    reward = LexiconSentimentReward(text="completion")

    def vader(prompts, completions, **kwargs) -> list[float]:
        return reward.score(prompts, completions, None).tolist()

    datasets.disable_progress_bars()
    steps = args.warmup + args.iterations
    prompts = openers(steps * PROMPTS, args.seed)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    if args.algorithm == "grpo":
        config_class, trainer_class = GRPOConfig, GRPOTrainer
        algorithm = dict(beta=GRPO_BETA, loss_type="grpo", epsilon=0.2, scale_rewards="group")
    else:
        config_class, trainer_class, algorithm = RLOOConfig, RLOOTrainer, dict(beta=KL)
    config = config_class(
        **algorithm,
        **trl_settings("rloo_iteration", steps, LR, 1.0, args.precision, args.gradient_checkpointing, args.seed),
        per_device_train_batch_size=PROMPTS * K,
        num_generations=K,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        steps_per_generation=1,
        shuffle_dataset=False,
    )
    timer = trl_step_timer()
    trainer = trainer_class(
        model=load_causal_lm("smollm2-135m-instruct"),
        reward_funcs=[vader],
        args=config,
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    torch.manual_seed(args.seed)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    lengths = [float(e.get("completions/mean_length", float("nan"))) for e in logs]
    rewards = [float(e["reward"]) for e in logs]
    return summary(timer.starts, timer.ends, lengths, rewards, args.warmup)


def summary(starts, ends, lengths, rewards, warmup: int) -> dict[str, Any]:
    seconds = [end - start for start, end in zip(starts, ends, strict=True)]
    timed = seconds[warmup:]
    return {
        "iteration_s": seconds,
        "median_s": statistics.median(timed),
        "mean_s": statistics.fmean(timed),
        "mean_completion_length": statistics.fmean(lengths[warmup:]) if lengths[warmup:] else None,
        "mean_reward": statistics.fmean(rewards[warmup:]) if rewards[warmup:] else None,
        "peak_rss_gb": peak_rss_gb(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("lit-align", "trl"), required=True)
    parser.add_argument("--algorithm", choices=("rloo", "grpo"), default="rloo", help="grpo: configs/imdb/grpo.yaml")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="lit-align's compile_layers")
    parser.add_argument("--reference-dtype", default=None, help="lit-align's reference_dtype (e.g. bfloat16)")
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default benchmarks/results/rloo_iteration_<only>_<precision>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = run_lit_align(args) if args.only == "lit-align" else run_trl(args)
    result["wall_s_including_setup"] = time.perf_counter() - started
    result["config"] = vars(args)
    result["torch"] = torch.__version__
    print(json.dumps({k: v for k, v in result.items() if k != "iteration_s"}, indent=1))
    prefix = "rloo_iteration" if args.algorithm == "rloo" else "grpo_iteration"
    out = args.out or f"benchmarks/results/{prefix}_{args.only}_{args.precision}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
