"""Task scores as the alignment tax: few-shot SST-2 read from the real GLUE files, its counting checked against a
model whose answer is known, the embedded model scored above chance, and the ``TaskScore`` callback in a fit."""

from __future__ import annotations

import csv
import gzip
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import SHARED_DATA
from helpers import fit, hh_pairs
from torch import nn

from callbacks import TaskScore
from lit_align import DPOModule
from lit_align.models import load_causal_lm, load_tokenizer
from lit_align.tasks import FewShotSST2, HeldoutPerplexity, LMEvalTask, Multi30kBLEU

SST2 = SHARED_DATA / "sst2"
needs_sst2 = pytest.mark.skipif(not (SST2 / "dev.tsv.gz").is_file(), reason="SST-2 is not in ../shared/data")


def dev_rows() -> list[tuple[str, int]]:
    """The dev TSV read with the csv module (independently of the task's datasets-based reader)."""
    with gzip.open(SST2 / "dev.tsv.gz", "rt", encoding="utf-8") as file:
        return [(row["sentence"].strip(), int(row["label"])) for row in csv.DictReader(file, delimiter="\t")]


class AlwaysSays(nn.Module):
    """A causal LM stand-in whose next-token logits always favour one token id (its answer is known)."""

    def __init__(self, token_id: int, vocabulary: int) -> None:
        super().__init__()
        self.token_id, self.vocabulary = token_id, vocabulary
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the task a device

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocabulary)
        logits[..., self.token_id] = 1.0
        return SimpleNamespace(logits=logits)


@needs_sst2
def test_the_prompt_and_examples_come_from_the_real_files():
    task = FewShotSST2(data_dir=str(SST2), shots=4, examples=50, seed=3)
    rows, prefix = task.prompt_and_examples()
    assert len(rows) == 50 and set(rows) <= set(dev_rows())  # dev sentences, not training ones
    assert prefix.count("Review: ") == 4 and prefix.count("Sentiment: positive") == 2  # balanced shots
    assert FewShotSST2(data_dir=str(SST2), shots=4, examples=50, seed=3).prompt_and_examples() == (rows, prefix)
    assert FewShotSST2(data_dir=str(SST2), shots=4, examples=None).prompt_and_examples()[0].__len__() == 872
    with pytest.raises(ValueError, match="even number"):
        FewShotSST2(shots=3)
    with pytest.raises(FileNotFoundError, match="nowhere/train.tsv.gz"):
        FewShotSST2(data_dir="nowhere").prompt_and_examples()


@needs_sst2
def test_counting_against_a_model_whose_answer_is_known():
    tokenizer = load_tokenizer("tiny-llama")
    task = FewShotSST2(data_dir=str(SST2), shots=2, examples=120, seed=0)
    rows, _ = task.prompt_and_examples()
    positive, negative = task.label_token_ids(tokenizer)[1], task.label_token_ids(tokenizer)[0]
    positives = sum(label for _, label in rows)
    assert task.score(AlwaysSays(positive, len(tokenizer)), tokenizer) == (positives, 120)
    assert task.score(AlwaysSays(negative, len(tokenizer)), tokenizer) == (120 - positives, 120)
    # ranks split the examples and their counts add up to the whole
    shares = [task.score(AlwaysSays(positive, len(tokenizer)), tokenizer, rank, 3) for rank in range(3)]
    assert tuple(map(sum, zip(*shares, strict=True))) == (positives, 120)


@pytest.mark.slow  # the embedded model on 100 sentences × 16 shots: about a minute and a half alone
@needs_sst2
def test_the_embedded_model_is_above_chance():
    """SmolLM2-135M-Instruct with the default 16 shots on 100 dev sentences (measured: 83 correct); a coin scores
    50 ± 10."""
    model = load_causal_lm("smollm2-135m-instruct").eval()
    correct, total = FewShotSST2(data_dir=str(SST2), examples=100).score(model, load_tokenizer("tiny-llama"))
    assert total == 100 and correct >= 70


@needs_sst2
def test_task_score_logs_the_tax_at_every_validation(hh_dir):
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", learning_rate=1e-3)
    data = hh_pairs(hh_dir, limit_train=16, batch_size=8, max_length=48, max_prompt_length=32)
    task = FewShotSST2(data_dir=str(SST2), shots=2, examples=20)
    trainer = fit(module, data, [TaskScore([task])], max_steps=2, val_check_interval=1, limit_val_batches=1)
    accuracy = float(trainer.callback_metrics["eval_tax/sst2_accuracy"])
    correct, total = task.score(module.policy.eval(), module.tokenizer)  # the final policy, scored again
    assert accuracy == pytest.approx(correct / total)
    with pytest.raises(ValueError, match="at least one task"):
        TaskScore([])


# ---- Multi30k BLEU, held-out perplexity, lm-eval -------------------------------------------------------------------

MULTI30K = SHARED_DATA / "multi30k"
needs_multi30k = pytest.mark.skipif(not (MULTI30K / "val.fr.gz").is_file(), reason="Multi30k is not in ../shared/data")


@needs_multi30k
def test_multi30k_bleu_summed_over_ranks_is_sacrebleus_corpus_bleu(monkeypatch):
    """Statistics of three rank shares add up to sacrebleu's corpus BLEU of every example (computed here directly),
    on translations half right (the references) and half wrong."""
    import sacrebleu

    task = Multi30kBLEU(data_dir=str(MULTI30K), source="en", target="fr", shots=2, examples=30, seed=1)
    rows, prefix = task.prompt_and_examples()
    assert len(rows) == 30 and prefix.count("English: ") == 2 and prefix.count("French: ") == 2
    answers = {source: (target if i % 2 else source) for i, (source, target) in enumerate(rows)}
    monkeypatch.setattr(task, "translations", lambda model, tokenizer, share: [answers[s] for s, _ in share])
    shares = [task.statistics(None, None, rank, 3) for rank in range(3)]
    totals = [sum(column) for column in zip(*shares, strict=True)]
    expected = sacrebleu.corpus_bleu([answers[s] for s, _ in rows], [[t for _, t in rows]]).score
    assert task.value(totals) == pytest.approx(expected, abs=1e-9) and 20 < expected < 100
    assert task.estimate(None, None).value == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match="language 'xx'"):
        Multi30kBLEU(target="xx")


@needs_multi30k
def test_multi30k_translations_are_the_models_greedy_line():
    task = Multi30kBLEU(data_dir=str(MULTI30K), shots=1, examples=3, max_new_tokens=6, batch_size=2)
    rows, _ = task.prompt_and_examples()
    model, tokenizer = load_causal_lm("tiny-llama").eval(), load_tokenizer("tiny-llama")
    translations = task.translations(model, tokenizer, rows)
    assert len(translations) == 3 and all("\n" not in t for t in translations)
    assert tokenizer.padding_side == "right"  # restored
    assert translations == task.translations(model, tokenizer, rows)  # greedy: deterministic


def test_heldout_perplexity_summed_over_ranks_is_the_pooled_perplexity(tmp_path):
    from lit_align.evaluate import text_nll

    texts = ["I liked the film a lot.", "The streets were empty and cold.", "A dull, long movie.", "Fine."]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n\n")
    task = HeldoutPerplexity(file=str(tmp_path / "texts.txt"), texts=3)
    model, tokenizer = load_causal_lm("tiny-llama").eval(), load_tokenizer("tiny-llama")
    totals = [sum(c) for c in zip(*(task.statistics(model, tokenizer, r, 2) for r in range(2)), strict=True)]
    sums, counts = text_nll(model, tokenizer, texts[:3])
    assert task.value(totals) == pytest.approx(math.exp(sum(sums) / sum(counts)), rel=1e-6)
    assert task.estimate(model, tokenizer).value == pytest.approx(task.value(totals), rel=1e-6)
    with pytest.raises(ValueError, match="exactly one of"):
        HeldoutPerplexity()


def test_an_lm_eval_task_that_cannot_run_is_skipped_with_its_reason_and_logs_nothing(hh_dir):
    """lm-eval is an optional extra: without it (or offline without its data) the task warns once why, logs nothing,
    and the other tasks still log."""
    import importlib.util

    module = DPOModule(model="tiny-llama", learning_rate=1e-3)
    data = hh_pairs(hh_dir, limit_train=8, batch_size=8, max_length=48, max_prompt_length=32)
    lm_eval_task = LMEvalTask("arc_easy", limit=4)
    perplexity = HeldoutPerplexity(file=__file__, texts=4)
    reason = "is not installed" if importlib.util.find_spec("lm_eval") is None else "could not run"
    with pytest.warns(UserWarning, match=rf"LMEvalTask 'arc_easy' skipped: lm-eval {reason}"):
        trainer = fit(module, data, [TaskScore([lm_eval_task, perplexity])], max_steps=1, limit_val_batches=1)
    assert "eval_tax/lm_eval_arc_easy" not in trainer.callback_metrics
    assert float(trainer.callback_metrics["eval_tax/heldout_perplexity"]) == pytest.approx(
        perplexity.value(perplexity.statistics(module.policy.eval(), module.tokenizer)), rel=1e-5
    )
    assert math.isnan(lm_eval_task.estimate(module.policy, module.tokenizer).value)
