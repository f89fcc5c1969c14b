"""Task scores as the alignment tax: few-shot SST-2 read from the real GLUE files, its counting checked against a
model whose answer is known, the embedded model scored above chance, and the ``TaskScore`` callback in a fit."""

from __future__ import annotations

import csv
import gzip
from types import SimpleNamespace

import pytest
import torch
from conftest import SHARED_DATA
from helpers import fit, hh_pairs
from torch import nn

from callbacks import TaskScore
from lit_align import DPOModule
from lit_align.models import load_causal_lm, load_tokenizer
from lit_align.tasks import FewShotSST2

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
