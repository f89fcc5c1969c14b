"""``lit-align evaluate``: the intervals on fixed samples against hand-computed values, and the evaluation of real
tiny policies (same prompts and seed for every policy, the reference's KL 0 and win rate ½)."""

from __future__ import annotations

import json
import math
import random

import pytest
from transformers import AutoModelForCausalLM

from datamodules import HHDataModule
from lit_align.evaluate import (
    evaluate_policies,
    perplexity_estimate,
    win_rate,
    write_rows,
)
from lit_align.generation import SamplingSettings
from lit_align.intervals import bootstrap_interval, mean_interval, t_quantile, wilson_interval
from lit_align.models import load_tokenizer, tiny_llama
from lit_align.rewards import LexiconSentimentReward


def test_t_quantiles_are_the_tabulated_ones():
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (100_000, 1.960)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)


def test_mean_interval_by_hand():
    # [1..5]: mean 3, s = √2.5 = 1.5811, se = s/√5 = 0.70711, t(0.975, 4) = 2.7764 → half-width 1.9632
    estimate = mean_interval([1, 2, 3, 4, 5])
    assert (estimate.value, estimate.n) == (3.0, 5)
    assert estimate.se == pytest.approx(0.70711, abs=1e-5)
    assert (estimate.low, estimate.high) == (pytest.approx(1.0368, abs=1e-4), pytest.approx(4.9632, abs=1e-4))
    single = mean_interval([2.5])
    assert single.value == 2.5 and math.isnan(single.low) and single.n == 1
    assert mean_interval([]).n == 0


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.95996: centre (0.8 + z²/20)/(1 + z²/10) = 0.71674, half z·√(0.016 + z²/400)/(1 + z²/10) = 0.22658
    estimate = wilson_interval(8, 10)
    assert estimate.value == 0.8
    assert (estimate.low, estimate.high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    zero = wilson_interval(0, 20)  # never a negative bound, unlike the normal approximation
    assert zero.low == pytest.approx(0.0, abs=1e-12) and 0.1 < zero.high < 0.2


def test_win_rate_counts_ties_as_half():
    estimate = win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])  # win, tie, loss, win → 2.5 / 4
    assert estimate.value == 0.625 and estimate.n == 4


def test_bootstrap_interval_is_seeded_and_agrees_with_the_t_interval_on_a_mean():
    generator = random.Random(1)
    values = [generator.gauss(10.0, 2.0) for _ in range(400)]

    def mean_of(indices):
        return sum(values[i] for i in indices) / len(indices)

    first, second = bootstrap_interval(mean_of, len(values)), bootstrap_interval(mean_of, len(values))
    assert first == second  # seeded
    assert first.value == pytest.approx(sum(values) / 400)
    reference = mean_interval(values)  # for a mean the percentile bootstrap ≈ the t interval (half-width ≈ 0.196)
    assert first.low == pytest.approx(reference.low, abs=0.05) and first.high == pytest.approx(reference.high, abs=0.05)
    constant = bootstrap_interval(lambda indices: 7.0, 10)
    assert (constant.low, constant.value, constant.high) == (7.0, 7.0, 7.0)


def test_perplexity_pools_tokens_over_texts():
    estimate = perplexity_estimate([2.0, 4.0], [1, 3])  # exp((2 + 4) / (1 + 3))
    assert estimate.value == pytest.approx(math.exp(1.5)) and estimate.n == 2
    assert estimate.low <= estimate.value <= estimate.high


@pytest.fixture
def two_policies(tmp_path):
    """tiny-llama itself (the reference) and a tiny-llama of another seed, both saved with the tiny tokenizer."""
    for name, seed in (("reference", 0), ("other", 3)):
        tiny_llama(seed).save_pretrained(tmp_path / name)
        load_tokenizer("tiny-llama").save_pretrained(tmp_path / name)
    return str(tmp_path / "reference"), str(tmp_path / "other")


def test_evaluate_policies_on_the_same_prompts_with_intervals(hh_dir, tmp_path, two_policies):
    reference, other = two_policies
    data = HHDataModule(data_path=str(hh_dir), train_split="test", val_split=None, holdout=12, limit_train=12)
    heldout = ["I liked the film a lot.", "The weather was cold and the streets were empty."]
    settings = dict(prompts=10, heldout_texts=heldout, sampling=SamplingSettings(max_new_tokens=6), seed=0)
    rows = evaluate_policies([other], reference, LexiconSentimentReward(), data, **settings)
    own, different = rows
    assert own["policy"] == reference and own["kl"] == 0.0 and own["win_rate"] == 0.5  # by construction
    assert different["prompts"] == own["prompts"] == 10 and different["reward_n"] == 10
    assert different["kl"] > 0.1 and different["kl_low"] < different["kl"] < different["kl_high"]
    assert different["perplexity_n"] == 2 and different["perplexity"] != own["perplexity"]
    for row in rows:
        for name in ("reward", "win_rate", "distinct_1", "self_bleu_3"):
            assert row[f"{name}_low"] <= row[name] <= row[f"{name}_high"], (name, row)
    again = evaluate_policies([other], reference, LexiconSentimentReward(), data, **settings)
    assert again[1] == different  # seeded: the same samples and scores
    csv_path, json_path = write_rows(rows, tmp_path / "evaluation")
    assert json.loads(json_path.read_text()) == rows
    assert len(csv_path.read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="gave no prompts"):
        evaluate_policies([other], reference, LexiconSentimentReward(), data, prompts=0)


def test_held_out_nll_of_padded_batches_equals_each_text_alone():
    """text_nll runs texts in right-padded batches (lit_align.rollout.text_token_logprobs, shared with validation's
    drift/perplexity); each text's summed NLL must equal a forward of that text alone. A one-token text is left out."""
    import torch

    from lit_align.evaluate import text_nll
    from lit_align.models import load_causal_lm

    model, tokenizer = load_causal_lm("tiny-llama").eval(), load_tokenizer("tiny-llama")
    texts = [
        "I liked the film a lot, more than I expected.",
        "Cold.",
        "a",
        "The weather was cold and the streets empty.",
    ]
    sums, counts = text_nll(model, tokenizer, texts)
    alone = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        if ids.shape[1] < 2:
            continue
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])
        alone.append((float(-logps.sum()), ids.shape[1] - 1))
    assert counts == [count for _, count in alone] and len(counts) == 3
    assert sums == pytest.approx([nll for nll, _ in alone], rel=1e-4)


def test_evaluate_without_a_reward_scores_the_tax_on_another_datamodules_held_out_texts(
    hh_dir, shared_data, tmp_path, two_policies
):
    """DPO policies have no reward to sample against: ``--reward`` is optional (no reward or win-rate columns), and
    ``--heldout_data`` takes the perplexity texts from a second DataModule (real IMDB reviews here)."""
    from datamodules import IMDBDataModule
    from lit_align.evaluate import main as evaluate_main
    from lit_align.evaluate import text_nll

    reference, other = two_policies
    imdb = dict(data_path=str(shared_data / "imdb"), val_split=None, holdout=20)
    evaluate_main(
        ["--policies", other, "--reference", reference, "--prompts", "4", "--sampling.max_new_tokens", "4",
         "--data.class_path", "datamodules.HHDataModule", "--data.init_args.data_path", str(hh_dir),
         "--data.init_args.train_split", "test", "--data.init_args.val_split", "null",
         "--data.init_args.holdout", "12", "--heldout_data.class_path", "datamodules.IMDBDataModule",
         *[arg for key, value in imdb.items() for arg in (f"--heldout_data.init_args.{key}", str(value))],
         "--reference_row", "false", "--out", str(tmp_path / "rows")]
    )  # fmt: skip
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["policy"] == other and row["kl"] > 0.1 and row["prompts"] == 4
    assert not {"reward", "win_rate"} & set(row)
    texts = IMDBDataModule(**imdb).heldout_texts(4)
    sums, counts = text_nll(AutoModelForCausalLM.from_pretrained(other).eval(), load_tokenizer(other), texts)
    assert row["perplexity_n"] == 4 and row["perplexity"] == pytest.approx(math.exp(sum(sums) / sum(counts)), rel=1e-4)


def test_a_list_of_references_is_their_soup(real_hh_dir, tmp_path, two_policies):
    """``reference: [a, b]`` evaluates against the equal-weight soup, exactly as against the soup written to disk."""
    from callbacks.reference_soup import save_soup

    reference, other = two_policies
    soup_dir = save_soup([reference, other], tmp_path / "soup")
    data = HHDataModule(data_path=str(real_hh_dir), train_split="test", val_split=None, holdout=12, limit_train=12)
    settings = dict(prompts=6, sampling=SamplingSettings(max_new_tokens=5), seed=0, reference_row=False)
    (in_memory,) = evaluate_policies([other], [reference, other], LexiconSentimentReward(), data, **settings)
    (on_disk,) = evaluate_policies([other], str(soup_dir), LexiconSentimentReward(), data, **settings)
    assert in_memory["reference"] == f"soup({reference}, {other})"
    assert in_memory["kl"] > 0.01 and in_memory["kl"] == pytest.approx(on_disk["kl"], rel=1e-5)
    assert in_memory["win_rate"] == on_disk["win_rate"]
