"""``lit-align evaluate``: score exported policies on one prompt set against one reference, each number with its
sample count and a 95 % interval.

For every policy (an exported directory, a Hub id or an alias), on the same prompts and with the same seed:

* ``reward``: the configured reward of the policy's completions (mean, Student-t interval);
* ``kl``: KL(π‖π_ref) estimated on the policy's own samples, Σ_t log π − log π_ref over the sampled tokens (the k1
  estimator, unbiased; mean, standard error and t interval) — the drift axis of Elastic Reset's frontier
  (Noukhovitch et al. 2023, §4);
* ``win_rate``: how often the policy's completion scores higher under the reward than the reference's completion
  to the same prompt (ties count ½; Wilson score interval, Wilson 1927);
* ``perplexity`` of held-out human text (a file, ``--heldout_data``'s DataModule's ``heldout_texts``, or the prompt
  DataModule's; percentile bootstrap over texts, 1,000 resamples);
* ``bleu`` against the prompts' references when the data has them (translation; sacrebleu corpus BLEU, bootstrap
  over sentences);
* diversity: ``distinct_{1,2,3}`` (per completion) and ``self_bleu_{3,4,5}`` (each completion against the others),
  t intervals over completions (:mod:`lit_align.metrics`);
* task scores (``--tasks``, :mod:`lit_align.tasks`: few-shot SST-2 accuracy, Multi30k BLEU, held-out perplexity,
  lm-eval tasks): the tax on a task, each with its own interval.

Without a reward (``--reward`` not given, e.g. for DPO policies scored on the tax only) the ``reward`` and
``win_rate`` columns are left out. One row per policy goes to CSV and JSON (``<name>_low`` / ``<name>_high`` hold
the interval, ``<name>_n`` the number of samples). The reference's own row is computed too (its KL is 0 and its win
rate ½ by construction).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datamodules.keys import PROMPT_ATTENTION_MASK, PROMPT_INPUT_IDS, REFERENCE
from lit_align.generation import SamplingSettings, decode_responses, sample_responses
from lit_align.intervals import Estimate, bootstrap_interval, mean_interval, wilson_interval
from lit_align.logprobs import response_logprobs
from lit_align.metrics import distinct_n, self_bleu_scores
from lit_align.models import load_causal_lm, load_tokenizer, torch_dtype
from lit_align.precision import AUTO, fastest_precision
from lit_align.rollout import text_token_logprobs

# ---- sampling and scoring ---------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Completions of one model to the evaluation prompts, in prompt order."""

    prompts: list[str]
    completions: list[str]
    sequences: list[Tensor]  # per batch: [B, P + R]
    attention: list[Tensor]
    response_masks: list[Tensor]
    widths: list[int]
    batches: list[dict]


@torch.no_grad()
def sample(model, tokenizer, batches: list[dict], sampling: SamplingSettings, seed: int) -> Samples:
    """One completion per prompt, seeded so every model starts from the same random state."""
    torch.manual_seed(seed)
    result = Samples([], [], [], [], [], [], batches)
    device = next(model.parameters()).device
    for batch in batches:
        ids, mask = batch[PROMPT_INPUT_IDS].to(device), batch[PROMPT_ATTENTION_MASK].to(device)
        sequences, attention, response_mask = sample_responses(model, tokenizer, ids, mask, sampling)
        prompts, completions = decode_responses(tokenizer, sequences, ids.shape[1], response_mask)
        result.prompts += prompts
        result.completions += completions
        result.sequences.append(sequences)
        result.attention.append(attention)
        result.response_masks.append(response_mask)
        result.widths.append(ids.shape[1])
    return result


@torch.no_grad()
def sequence_kl(policy, reference, samples: Samples, temperature: float) -> list[float]:
    """Σ_t log π(y_t|·) − log π_ref(y_t|·) over each sampled completion (k1; its mean estimates KL(π‖π_ref))."""
    values: list[float] = []
    for sequences, attention, response_mask, width in zip(
        samples.sequences, samples.attention, samples.response_masks, samples.widths, strict=True
    ):
        logps = response_logprobs(policy, sequences, attention, width, temperature).logps
        ref_logps = response_logprobs(reference, sequences, attention, width, temperature).logps
        values += ((logps - ref_logps) * response_mask).sum(-1).tolist()
    return values


def rewards_of(reward, samples: Samples) -> list[float]:
    from lit_align.rewards import check_reward_scores

    scores: list[float] = []
    start = 0
    for batch, sequences in zip(samples.batches, samples.sequences, strict=True):
        stop = start + sequences.shape[0]
        prompts, completions = samples.prompts[start:stop], samples.completions[start:stop]
        values = check_reward_scores(reward(prompts, completions, batch), reward, completions, batch)
        scores += values.float().cpu().tolist()
        start = stop
    return scores


def text_nll(model, tokenizer, texts: Sequence[str], max_length: int = 256) -> tuple[list[float], list[int]]:
    """Per text with at least two tokens: the summed negative log-likelihood of its tokens after the first, and
    their count (:func:`lit_align.rollout.text_token_logprobs`)."""
    sums, counts = [], []
    for logps, mask in text_token_logprobs(model, tokenizer, texts, max_length):
        for nll, count in zip((-(logps * mask)).sum(-1).tolist(), mask.sum(-1).tolist(), strict=True):
            if count > 0:
                sums.append(nll)
                counts.append(int(count))
    return sums, counts


def perplexity_estimate(sums: list[float], counts: list[int]) -> Estimate:
    """exp(Σ NLL / Σ tokens) over texts, with a bootstrap over texts."""

    def statistic(indices: list[int]) -> float:
        return math.exp(sum(sums[i] for i in indices) / max(sum(counts[i] for i in indices), 1))

    return bootstrap_interval(statistic, len(sums))


def bleu_estimate(completions: list[str], references: list[str]) -> Estimate:
    """sacrebleu corpus BLEU of the completions against one reference each, with a bootstrap over sentences."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()

    def statistic(indices: list[int]) -> float:
        return bleu.corpus_score([completions[i] for i in indices], [[references[i] for i in indices]]).score

    return bootstrap_interval(statistic, len(completions), resamples=200)


def win_rate(scores: list[float], reference_scores: list[float]) -> Estimate:
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference_scores, strict=True))
    return wilson_interval(wins, len(scores))


# ---- the evaluation ---------------------------------------------------------------------------------------------


def evaluation_batches(datamodule, tokenizer, prompts: int, split: str = "validate") -> list[dict]:
    """The first ``prompts`` prompts of the DataModule's validation (or ``test``) split, in its fixed order."""
    datamodule.configure(tokenizer, "prompt")
    datamodule.setup(split)
    loader = datamodule.val_dataloader() if split == "validate" else datamodule.test_dataloader()
    loaders = loader if isinstance(loader, list) else [loader]
    batches, count = [], 0
    for loader in loaders:
        for batch in loader:
            if count >= prompts:
                break
            keep = min(prompts - count, len(batch[PROMPT_INPUT_IDS]))
            batches.append({k: v[:keep] for k, v in batch.items()})
            count += keep
    if count == 0:
        raise ValueError(f"evaluate: the DataModule's {split} split gave no prompts")
    if count < prompts:
        print(f"lit-align evaluate: the {split} split has {count} prompts (asked for {prompts})", flush=True)
    return batches


def evaluate_policies(
    policies: Sequence[str],
    reference: str | Sequence[str],
    reward,
    datamodule,
    prompts: int = 128,
    heldout_texts: Sequence[str] | None = None,
    sampling: SamplingSettings = SamplingSettings(),
    seed: int = 0,
    dtype: str = "float32",
    precision: str = "32-true",
    tasks: Sequence = (),
    reference_row: bool = True,
) -> list[dict[str, Any]]:
    """One row per policy (the reference first, as ``reference``); see the module docstring for the columns.
    ``reference``: a model, or a list of models whose equal-weight average (a soup, ``callbacks.ReferenceSoup``'s
    reference) is the reference.
    ``precision``: ``32-true``, ``bf16-mixed`` (bf16 autocast) or ``auto``
    (:func:`lit_align.precision.fastest_precision`). ``tasks``: task scores (:mod:`lit_align.tasks`), each an
    accuracy with its Wilson interval. ``reference_row=False`` leaves out the reference's own row (its samples are
    still drawn: the win rate needs them)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = fastest_precision(device.type) if precision == AUTO else precision
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"evaluate: precision must be 32-true, bf16-mixed or auto, got {precision!r}")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        is_soup = not isinstance(reference, str)
        if is_soup:
            from callbacks.reference_soup import soup_model

            reference = [str(member) for member in reference]
        tokenizer = load_tokenizer(reference[0] if is_soup else reference)
        batches = evaluation_batches(datamodule, tokenizer, prompts)
        if heldout_texts is None and hasattr(datamodule, "heldout_texts"):
            heldout_texts = datamodule.heldout_texts(prompts)
        reference_model = soup_model(reference).to(torch_dtype(dtype)) if is_soup else load_causal_lm(reference, dtype)
        reference_model = reference_model.to(device).eval()
        reward = reward.to(device) if hasattr(reward, "to") else reward
        needs_reference_samples = reward is not None or reference_row or reference in policies
        reference_samples = (
            sample(reference_model, tokenizer, batches, sampling, seed) if needs_reference_samples else None
        )
        reference_scores = rewards_of(reward, reference_samples) if reward is not None else None
        references = [r for batch in batches for r in batch.get(REFERENCE, [])]
        rows = []
        reference_name = f"soup({', '.join(reference)})" if is_soup else reference
        for name in [reference, *policies] if reference_row else policies:
            is_reference = name == reference
            model = reference_model if is_reference else load_causal_lm(name, dtype).to(device).eval()
            if not is_reference and len(load_tokenizer(name)) != len(tokenizer):
                raise ValueError(f"evaluate: {name}'s tokenizer differs from the reference {reference}'s")
            samples = reference_samples if is_reference else sample(model, tokenizer, batches, sampling, seed)
            row: dict[str, Any] = {
                "policy": reference_name if is_reference else str(name),
                "reference": reference_name,
                "seed": seed,
                "prompts": len(samples.completions),
            }
            if reward is not None:
                scores = reference_scores if is_reference else rewards_of(reward, samples)
                row.update(mean_interval(scores).columns("reward"))
            row.update(mean_interval(sequence_kl(model, reference_model, samples, sampling.temperature)).columns("kl"))
            if reward is not None:
                row.update(win_rate(scores, reference_scores).columns("win_rate"))
            if heldout_texts:
                row.update(perplexity_estimate(*text_nll(model, tokenizer, heldout_texts)).columns("perplexity"))
            if references and len(references) == len(samples.completions) and all(references):
                row.update(bleu_estimate(samples.completions, references).columns("bleu"))
            for n in (1, 2, 3):
                row.update(mean_interval([distinct_n(c, n) for c in samples.completions]).columns(f"distinct_{n}"))
            for n in (3, 4, 5):
                row.update(mean_interval(self_bleu_scores(samples.completions, n)).columns(f"self_bleu_{n}"))
            for task in tasks:
                row.update(task.estimate(model, tokenizer).columns(task.name))
            rows.append(row)
            summary = f"KL {row['kl']:.2f} ± {row.get('kl_se', math.nan):.2f}"
            if reward is not None:
                summary = (
                    f"reward {row['reward']:.3f} [{row['reward_low']:.3f}, {row['reward_high']:.3f}], {summary}, "
                    f"win rate {row['win_rate']:.2f}"
                )
            if "perplexity" in row:
                summary += f", perplexity {row['perplexity']:.1f}"
            print(f"  {row['policy']}: {summary}", flush=True)
            if not is_reference:
                del model
    return rows


def write_rows(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> list[Path]:
    """``path`` as CSV (one row per policy, the union of the columns) and the same rows as ``<stem>.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path.with_suffix(".csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return [path.with_suffix(".csv"), path.with_suffix(".json")]


def evaluate_parser():
    """The argument parser of ``lit-align evaluate`` (every option may also come from ``--config``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning import LightningDataModule

    from lit_align.rewards import RewardFunction
    from lit_align.tasks import Task

    parser = ArgumentParser(prog="lit-align evaluate", description=main.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--policies", type=str, nargs="+", required=True, help="exported policy directories / models")
    parser.add_argument(
        "--reference", type=str | list[str], required=True, help="the reference model, or a list: their soup"
    )
    parser.add_subclass_arguments(RewardFunction, "reward", required=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parser.add_subclass_arguments(
        LightningDataModule, "heldout_data", required=False, help="a DataModule whose heldout_texts give perplexity"
    )
    parser.add_argument("--prompts", type=int, default=128, help="evaluation prompts (the first of the split)")
    parser.add_argument(
        "--heldout_file", type=str | None, default=None, help="human texts for perplexity, one per line"
    )
    parser.add_argument("--sampling", type=SamplingSettings, default=SamplingSettings())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", type=str, default="float32", help="the dtype models are loaded in")
    parser.add_argument("--precision", type=str, default="32-true", help="32-true, bf16-mixed or auto")
    parser.add_argument("--tasks", type=list[Task], default=[], help="task scores (lit_align.tasks)")
    parser.add_argument("--reference_row", type=bool, default=True, help="also score the reference itself")
    parser.add_argument("--out", type=str, default="evaluation", help="writes <out>.csv and <out>.json")
    return parser


def main(args: list[str] | None = None) -> None:
    """``lit-align evaluate --policies DIR [DIR ...] --reference MODEL --reward.class_path ... --data.class_path ...
    [--config evaluate.yaml] [--prompts 128] [--out evaluation]``: every option may come from a YAML file, and any
    DataModule argument can be swapped on the command line (e.g. ``--data.init_args.data_path ../shared/data/imdb``)."""
    parser = evaluate_parser()
    config = parser.parse_args(args)
    objects = parser.instantiate_classes(config)
    heldout = None
    if config.heldout_file:
        heldout = [line for line in Path(config.heldout_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    elif objects.get("heldout_data") is not None:
        if not hasattr(objects.heldout_data, "heldout_texts"):
            raise ValueError(f"evaluate: --heldout_data {type(objects.heldout_data).__name__} has no heldout_texts")
        heldout = objects.heldout_data.heldout_texts(config.prompts)
    rows = evaluate_policies(
        config.policies,
        config.reference,
        objects.reward,
        objects.data,
        config.prompts,
        heldout,
        objects.sampling,
        config.seed,
        config.dtype,
        config.precision,
        objects.tasks,
        config.reference_row,
    )
    for path in write_rows(rows, config.out):
        print(f"lit-align evaluate: wrote {path}")
