"""IMDBDataModule: review → (first half, rest) prompts, tail truncation, shipped openers, held-out texts, errors."""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

from datamodules import (
    PROMPT,
    PROMPT_ATTENTION_MASK,
    PROMPT_INPUT_IDS,
    REFERENCE,
    DataValidationError,
    IMDBDataModule,
)
from datamodules.imdb import SHIPPED_OPENERS, clean_review, review_prompt


def write_reviews(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def review(i: int, words: int = 20, label: int = 1) -> dict:
    body = " ".join(f"w{i}x{j}" for j in range(words))
    return {"id": i, "label": label, "text": f"Review {i}.<br /><br />{body}"}


def non_pad(batch: dict, row: int) -> list[int]:
    return batch[PROMPT_INPUT_IDS][row][batch[PROMPT_ATTENTION_MASK][row].bool()].tolist()


def opener_lines() -> tuple[list[str], list[str]]:
    lines = Path(SHIPPED_OPENERS).read_text(encoding="utf-8").splitlines()
    return [x for x in lines if x.startswith("#")], [x.strip() for x in lines if x.strip() and not x.startswith("#")]


# ---- pure helpers, against hand-written values ---------------------------------------------------


def test_clean_and_split_hand_values():
    raw = "Great  film.<br /><br />Really\tgood <BR/>acting, bad\n ending."
    assert clean_review(raw) == "Great film. Really good acting, bad ending."
    # 7 words -> floor(3.5) = 3 prompt words; the reference keeps its leading space
    assert review_prompt(raw) == ("Great film. Really", " good acting, bad ending.")
    assert review_prompt("a b c d e f g h i j", 0.3) == ("a b c", " d e f g h i j")
    assert review_prompt("one two", 0.1) == ("one", " two")  # at least one word on each side


# ---- real IMDB rows ------------------------------------------------------------------------------


def test_real_rows_first_half_tail_truncated_and_reconstruct(shared_data, tokenizer):
    path = shared_data / "imdb"
    with gzip.open(path / "train.jsonl.gz", "rt", encoding="utf-8") as handle:
        raw_texts = [json.loads(line)["text"] for line in handle]
    # independent cleaning: the files only use the "<br />" spelling
    cleaned = {" ".join(re.sub("<br />", " ", t).split()): t for t in raw_texts}

    dm = IMDBDataModule(data_path=str(path), val_split=None, holdout=16, limit_train=48, batch_size=16)
    dm.attach(tokenizer, "prompt").setup()
    assert dm.max_prompt_length == 64
    records = dm.dataset("train").records
    assert len(records) == 48 and len(dm.dataset("val")) == 16
    had_br = 0
    for record in records:
        full = record[PROMPT] + record[REFERENCE]
        assert full in cleaned, "prompt + reference must be exactly the cleaned review"
        had_br += "<br />" in cleaned[full]
        words = full.split()
        half = len(words) // 2
        assert record[PROMPT].split() == words[:half]
        assert record[REFERENCE].split() == words[half:]
        assert "<br" not in record[PROMPT] and "<br" not in record[REFERENCE]
    assert had_br > 0, "the sample should include reviews with HTML line breaks"

    batch = next(iter(dm.dataloader("train", batch_size=48)))
    assert batch[PROMPT] == [r[PROMPT] for r in records]  # untruncated strings
    truncated = exact = 0
    for i, prompt in enumerate(batch[PROMPT]):
        ids = non_pad(batch, i)
        full_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert len(ids) <= 64 and ids == full_ids[-64:]  # the tail is kept
        truncated += len(full_ids) > 64
        decoded = tokenizer.decode(ids)
        if len(full_ids) <= 64:
            exact += decoded == prompt
        elif "\ufffd" not in decoded:  # a cut inside a multi-byte character would not decode cleanly
            assert prompt.endswith(decoded)
    assert truncated > 0 and exact == len(records) - truncated
    assert dm.truncation_stats["train"]["prompt_truncated"] == truncated


def test_real_heldout_texts_deterministic_and_validation_only(shared_data):
    kwargs = dict(data_path=str(shared_data / "imdb"), val_split=None, holdout=30, seed=3)
    dm = IMDBDataModule(**kwargs)
    texts = dm.heldout_texts()
    assert len(texts) == 30 and texts == IMDBDataModule(**kwargs).heldout_texts()
    assert dm.heldout_texts(7) == texts[:7]
    train, val = dm._native_records()
    assert sorted(texts) == sorted(r[PROMPT] + r[REFERENCE] for r in val)
    train_texts = {r[PROMPT] + r[REFERENCE] for r in train}
    assert not train_texts & set(texts)
    assert all("<br" not in t for t in texts)


# ---- shipped openers -----------------------------------------------------------------------------


def test_shipped_openers_file():
    header, lines = opener_lines()
    assert header and "lit-align" in header[0]
    assert len(lines) >= 300
    assert len(set(lines)) == len(lines), "duplicate openers"
    assert all(4 <= len(x.split()) <= 15 for x in lines)
    assert "<" not in "".join(lines)
    # installed as package data, next to the module
    assert (resources.files("datamodules") / "prompts" / "imdb_openers.txt").is_file()


def test_shipped_openers_default_left_padded_and_holdout_disjoint(tokenizer):
    _, lines = opener_lines()
    dm = IMDBDataModule(batch_size=8).attach(tokenizer, "prompt")
    assert dm.data_path == SHIPPED_OPENERS and dm.holdout == 32
    dm.setup()
    train = [r[PROMPT] for r in dm.dataset("train").records]
    val = [r[PROMPT] for r in dm.dataset("val").records]
    assert len(val) == 32 and len(train) == len(lines) - 32
    assert not set(train) & set(val) and sorted(train + val) == sorted(lines)
    assert all(REFERENCE not in r for r in dm.dataset("train").records)

    batch = next(iter(dm.dataloader("train")))
    assert REFERENCE not in batch
    mask = batch[PROMPT_ATTENTION_MASK]
    lengths = mask.sum(1)
    assert lengths.min() < mask.shape[1], "openers differ in length, so some rows are padded"
    for i, prompt in enumerate(batch[PROMPT]):
        n = int(lengths[i])
        assert torch.equal(mask[i], torch.tensor([0] * (mask.shape[1] - n) + [1] * n))  # padding on the left
        assert tokenizer.decode(non_pad(batch, i)) == prompt

    held = dm.heldout_texts()
    assert sorted(held) == sorted(val) and held == IMDBDataModule().heldout_texts()


def test_openers_file_options(tmp_path):
    with pytest.raises(ValueError, match="unlabelled openers"):
        IMDBDataModule(label=1)
    path = tmp_path / "mine.txt"
    path.write_text("# my openers\n\nThe first film I saw\nA quiet drama about a baker\nThe last scene\n")
    dm = IMDBDataModule(data_path=str(path), holdout=0)
    with pytest.raises(ValueError, match="val_split=None"):
        dm._native_records()
    dm = IMDBDataModule(data_path=str(path), holdout=0, val_split=None)
    train, val = dm._native_records()
    assert [r[PROMPT] for r in train] == ["The first film I saw", "A quiet drama about a baker", "The last scene"]
    assert val is None
    with pytest.raises(ValueError, match="no validation side"):
        dm.heldout_texts()


# ---- small fixtures: splits, skips, errors, label filter -----------------------------------------


def test_heldout_texts_from_val_split_only(tmp_path):
    write_reviews(tmp_path / "imdb" / "train.jsonl", [review(i) for i in range(10)])
    write_reviews(tmp_path / "imdb" / "test.jsonl", [review(100 + i) for i in range(6)])
    dm = IMDBDataModule(data_path=str(tmp_path / "imdb"))
    texts = dm.heldout_texts()
    assert sorted(texts) == sorted(clean_review(review(100 + i)["text"]) for i in range(6))
    assert texts == IMDBDataModule(data_path=str(tmp_path / "imdb")).heldout_texts()
    assert dm.heldout_texts(0) == [] and dm.heldout_texts(2) == texts[:2]


def test_short_reviews_skipped_and_counted(tmp_path, tokenizer):
    rows = [review(i) for i in range(6)] + [{"label": 1, "text": "Too short.<br /><br />Really."}, review(9, words=5)]
    # review(9, words=5) has 2 + 5 = 7 words (< 8); min_words counts the cleaned words
    write_reviews(tmp_path / "imdb" / "train.jsonl", rows)
    dm = IMDBDataModule(data_path=str(tmp_path / "imdb"), val_split=None)
    dm.setup()  # skips are counted when the rows are read, before any tokenizer is attached
    assert sum(dm.skip_stats["train"].values()) == 2
    dm.attach(tokenizer, "prompt")
    assert len(dm.dataset("train")) == 6
    assert sum(dm.skip_stats["train"].values()) == 2
    assert "min_words=8" in next(iter(dm.skip_stats["train"]))
    dm = IMDBDataModule(data_path=str(tmp_path / "imdb"), val_split=None, min_words=3)
    assert len(dm._native_records()[0]) == 8


@pytest.mark.parametrize(
    "bad, detail",
    [({"label": 1}, "missing or null"), ({"label": 1, "text": ""}, "empty string"), ({"text": 5}, "int")],
)
def test_bad_text_names_file_row_field(tmp_path, bad, detail):
    path = write_reviews(tmp_path / "imdb" / "train.jsonl", [review(0), review(1), bad, review(3)])
    dm = IMDBDataModule(data_path=str(tmp_path / "imdb"), val_split=None)
    with pytest.raises(DataValidationError) as err:
        dm._native_records()
    message = str(err.value)
    assert str(path) in message and "row 3" in message and "'text'" in message and detail in message


def test_label_filter(tmp_path, tokenizer):
    rows = [review(i, label=i % 2) for i in range(10)]
    write_reviews(tmp_path / "imdb" / "train.jsonl", rows)
    dm = IMDBDataModule(data_path=str(tmp_path / "imdb"), val_split=None, label=0)
    dm.attach(tokenizer, "prompt").setup()
    kept = {r[PROMPT].split(".")[0] for r in dm.dataset("train").records}
    assert kept == {f"Review {i}" for i in range(0, 10, 2)}
    assert dm.skip_stats["train"] == {"label != 0 (label filter)": 5}

    path = write_reviews(tmp_path / "bad" / "train.jsonl", [review(0), {"label": "1", "text": "a b c d e f g h i"}])
    with pytest.raises(DataValidationError) as err:
        IMDBDataModule(data_path=str(path), val_split=None, label=1)._native_records()
    assert str(path) in str(err.value) and "row 2" in str(err.value) and "'label'" in str(err.value)
    # without a filter the label is not read at all
    assert len(IMDBDataModule(data_path=str(path), val_split=None)._native_records()[0]) == 2
    with pytest.raises(ValueError, match="label must be an int"):
        IMDBDataModule(data_path=str(path), label=True)


def test_text_mode_is_the_cleaned_review(tmp_path, tokenizer):
    write_reviews(tmp_path / "imdb" / "train.jsonl", [review(i) for i in range(4)])
    dm = IMDBDataModule(data_path=str(tmp_path / "imdb"), val_split=None).attach(tokenizer, "text")
    dm.setup()
    batch = next(iter(dm.dataloader("train")))
    assert batch["text"] == [clean_review(review(i)["text"]) for i in range(4)]


def test_invalid_arguments():
    for kwargs, match in [
        ({"prompt_fraction": 0.0}, "prompt_fraction"),
        ({"prompt_fraction": 1.0}, "prompt_fraction"),
        ({"min_words": 1}, "min_words"),
    ]:
        with pytest.raises(ValueError, match=match):
            IMDBDataModule(**kwargs)
