"""Tokenization through ``datasets.map`` and its on-disk cache (``datamodules/collation.py``): a cached split equals a
freshly tokenized one, every setting that changes the ids changes the key, and nothing is written when caching is
off. (The 2-process DDP run that tokenizes once and loads the cache on the other rank is in test_distributed.py.)"""

from __future__ import annotations

import copy
import os

import datasets
import pytest

from datamodules import TRLFormatDataModule
from datamodules.collation import tokenize_columns
from datamodules.keys import CHOSEN, PROMPT, REJECTED

ROWS = [
    {
        "prompt": f"Question {i}: " + "why is the sky blue " * (i % 7),
        "chosen": " Because of Rayleigh scattering." * (1 + i % 3),
        "rejected": " No idea.",
    }
    for i in range(40)
]


def module(tmp_path, tokenizer, **kwargs) -> TRLFormatDataModule:
    path = tmp_path / "pairs.jsonl"
    if not path.exists():
        datasets.Dataset.from_list(ROWS).to_json(path)
    kwargs = {"max_length": 32, "max_prompt_length": 16, "cache_dir": str(tmp_path / "cache"), **kwargs}
    dm = TRLFormatDataModule(data_path=str(path), holdout=8, **kwargs)
    dm.setup("fit")
    return dm.attach(tokenizer, "pair")


def items(dm, split: str) -> list[dict]:
    data = dm.dataset(split)
    return [data[i] for i in range(len(data))]


def entries(tmp_path) -> list[str]:
    cache = tmp_path / "cache"
    return sorted(name for name in os.listdir(cache) if not name.startswith(".")) if cache.exists() else []


def test_a_second_run_loads_the_cache_and_gets_the_same_items(tmp_path, tokenizer):
    first = module(tmp_path, tokenizer)
    fresh = {"train": items(first, "train")}
    assert len(entries(tmp_path)) == 1  # a split is tokenized on its first use only
    fresh["val"] = items(first, "val")
    assert [source for _, source, _, _ in first.tokenization_log] == ["tokenized", "tokenized"]
    assert len(entries(tmp_path)) == 2

    second = module(tmp_path, tokenizer)
    cached = {split: items(second, split) for split in ("train", "val")}
    assert [source for _, source, _, _ in second.tokenization_log] == ["cache", "cache"]
    assert cached == fresh
    assert second.truncation_stats == first.truncation_stats
    assert first.truncation_stats["train"]["prompt_truncated"] > 0  # the settings do cut rows here
    # the batched DataLoader fetch reads the same rows as item-by-item access
    assert second.dataset("train").__getitems__([3, 0, 5]) == [cached["train"][i] for i in (3, 0, 5)]


def test_the_ids_equal_a_row_by_row_tokenization(tmp_path, tokenizer):
    """Independent check of the batched map: tokenize each row on its own and truncate by hand."""
    dm = module(tmp_path, tokenizer, max_length=24, max_prompt_length=8)
    eos = tokenizer.eos_token_id
    for item in items(dm, "train"):
        prompt = tokenizer(item[PROMPT], add_special_tokens=False).input_ids[-8:]
        assert item["prompt_ids"] == prompt
        for side in (CHOSEN, REJECTED):
            expected = (tokenizer(item[side], add_special_tokens=False).input_ids + [eos])[: 24 - len(prompt)]
            assert item[f"{side}_ids"] == expected


@pytest.mark.parametrize(
    "change",
    [{"max_length": 40}, {"max_prompt_length": 8}, "tokenizer", "data"],
    ids=["max_length", "max_prompt_length", "tokenizer", "data"],
)
def test_anything_that_changes_the_ids_misses_the_cache(tmp_path, tokenizer, change):
    first = module(tmp_path, tokenizer)
    first.dataset("train"), first.dataset("val")
    assert len(entries(tmp_path)) == 2
    kwargs, other = {}, tokenizer
    if change == "tokenizer":
        other = copy.deepcopy(tokenizer)
        other.add_tokens(["<new_token>"])
    elif change == "data":
        (tmp_path / "pairs.jsonl").write_text(
            (tmp_path / "pairs.jsonl").read_text().replace("Rayleigh", "Mie", 1), encoding="utf-8"
        )
    else:
        kwargs = change
    changed = module(tmp_path, other, **kwargs)
    changed.dataset("train"), changed.dataset("val")
    sources = dict((role, source) for role, source, _, _ in changed.tokenization_log)
    if change == "data":  # one train row changed; the held-out rows may or may not include it
        assert sources["train"] == "tokenized" or sources["val"] == "tokenized"
    else:
        assert sources == {"train": "tokenized", "val": "tokenized"}
    assert len(entries(tmp_path)) > 2


def test_no_cache_writes_nothing_and_num_proc_gives_the_same_ids(tmp_path, tokenizer):
    single = items(module(tmp_path, tokenizer, cache_tokenized=False), "train")
    assert entries(tmp_path) == []
    parallel = module(tmp_path, tokenizer, cache_tokenized=False, num_proc=2)
    assert items(parallel, "train") == single
    assert entries(tmp_path) == []
    with pytest.raises(ValueError, match="num_proc must be >= 1"):
        module(tmp_path, tokenizer, num_proc=0)


def test_datasets_disable_caching_turns_the_cache_off(tmp_path, tokenizer):
    datasets.disable_caching()
    try:
        module(tmp_path, tokenizer).dataset("train")
    finally:
        datasets.enable_caching()
    assert entries(tmp_path) == []


def test_text_rows_get_the_eos_and_keep_their_head():
    """``tokenize_columns`` on language-modelling rows, against a hand-built expectation."""

    class CharTokenizer:  # one id per character: the truncation arithmetic is visible
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) for c in text] for text in texts]}

    out = tokenize_columns({"text": ["abc", "abcdefgh"]}, CharTokenizer(), max_length=5, max_prompt_length=2)
    assert out["completion_ids"] == [[97, 98, 99, 0], [97, 98, 99, 100, 101]]
    assert out["prompt_ids"] == [[], []]
    assert out["completion_truncated"] == [False, True]
