"""StackExchangeDataModule (lvwerra/stack-exchange-paired schema) on small written fixtures."""

from __future__ import annotations

import json

import pytest

from datamodules import (
    CHOSEN_INPUT_IDS,
    REJECTED_INPUT_IDS,
    DataValidationError,
    StackExchangeDataModule,
)


def se_row(i: int, **overrides) -> dict:
    row = {
        "qid": i,
        "question": f"How do I sort list number {i} in Python?",
        "date": "2020/01/01",
        "metadata": [f"https://stackoverflow.com/questions/{i}"],
        "response_j": f"Use sorted(xs) for list {i}.",
        "response_k": "I don't know.",
    }
    row.update(overrides)
    return {k: v for k, v in row.items() if v is not None}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_dm(tmp_path, rows, **kwargs):
    write_jsonl(tmp_path / "se" / "train.jsonl", rows)
    return StackExchangeDataModule(data_path=str(tmp_path / "se"), val_split=None, **kwargs)


def test_prompt_chosen_rejected(tmp_path, tokenizer):
    dm = make_dm(tmp_path, [se_row(0), se_row(1), se_row(2)])
    dm.attach(tokenizer, "pair").setup("fit")
    records = dm.dataset("train").records
    assert len(records) == 3
    assert records[0] == {
        "prompt": "Question: How do I sort list number 0 in Python?\n\nAnswer:",
        "chosen": " Use sorted(xs) for list 0.",
        "rejected": " I don't know.",
    }
    assert [r["chosen"] for r in records] == [f" Use sorted(xs) for list {i}." for i in range(3)]


def test_equal_answers_skipped_and_counted(tmp_path, tokenizer):
    dm = make_dm(tmp_path, [se_row(0), se_row(1, response_k="Use sorted(xs) for list 1."), se_row(2)])
    dm.attach(tokenizer, "pair").setup("fit")
    assert len(dm.dataset("train")) == 2
    assert sum(dm.skip_stats["train"].values()) == 1
    assert "response_j == response_k" in next(iter(dm.skip_stats["train"]))


def test_missing_response_k_names_file_row_field(tmp_path):
    dm = make_dm(tmp_path, [se_row(0), se_row(1, response_k=None), se_row(2)])
    with pytest.raises(DataValidationError) as info:
        dm.setup("fit")  # validation needs no tokenizer
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'se' / 'train.jsonl'}: row 2: field 'response_k'"), message


def test_pair_batch_equal_width(tmp_path, tokenizer):
    rows = [se_row(0), se_row(1, response_k="A much longer rejected answer. " * 5), se_row(2)]
    dm = make_dm(tmp_path, rows, batch_size=3)
    dm.setup("fit")
    dm.attach(tokenizer, "pair")
    batch = next(iter(dm.dataloader("train")))
    assert batch[CHOSEN_INPUT_IDS].shape == batch[REJECTED_INPUT_IDS].shape
    assert batch[CHOSEN_INPUT_IDS].shape[0] == 3
