"""Benchmark DataModules: parsing, validation errors, the four data modes' batches, truncation, splits."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules import (
    ATTENTION_MASK,
    CHOSEN_ATTENTION_MASK,
    CHOSEN_COMPLETION_MASK,
    CHOSEN_INPUT_IDS,
    COMPLETION_MASK,
    DATA_MODES,
    INDEX,
    INPUT_IDS,
    KL_ATTENTION_MASK,
    KL_COMPLETION_MASK,
    KL_INPUT_IDS,
    LABEL,
    PROMPT_ATTENTION_MASK,
    PROMPT_INPUT_IDS,
    REJECTED_ATTENTION_MASK,
    REJECTED_COMPLETION_MASK,
    REJECTED_INPUT_IDS,
    BenchmarkDataModule,
    DataValidationError,
    HHDataModule,
    TLDRDataModule,
    UltraFeedbackDataModule,
)
from datamodules.base import NotAttachedError
from datamodules.collation import Collator, pad
from datamodules.readers import require_str


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows as JSON lines (gzip if the name ends in .gz); ``raw_lines`` replaces 1-based lines
    verbatim."""
    lines = [json.dumps(r) for r in rows]
    for number, text in (raw_lines or {}).items():
        lines[number - 1] = text
    data = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def hh_row(i: int, chosen: str | None = None, rejected: str | None = None) -> dict:
    prompt = f"\n\nHuman: Question number {i}?\n\nAssistant: Which one?\n\nHuman: Tell me about {i}.\n\nAssistant:"
    return {
        "chosen": prompt + (chosen if chosen is not None else f" Here is a good answer about {i}."),
        "rejected": prompt + (rejected if rejected is not None else f" No idea, go away {i}."),
    }


def hh_dm(tmp_path: Path, rows: list, tokenizer, mode: str = "pair", **kwargs) -> HHDataModule:
    write_jsonl(tmp_path / "hh" / "test.jsonl", rows)
    kwargs.setdefault("val_split", None)
    dm = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", **kwargs)
    return dm.attach(tokenizer, mode)


def masked(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


# ---- HH-RLHF on the real files -------------------------------------------------------------------


def test_hh_real_rows_parse_and_reconstruct(shared_data, tokenizer):
    root = shared_data / "hh_rlhf"
    with gzip.open(root / "helpful-base" / "test.jsonl.gz", "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle]
    dm = HHDataModule(data_path=str(root), subsets=["helpful-base"], train_split="test", val_split=None)
    dm.attach(tokenizer, "pair").setup("fit")
    records = dm.dataset("train").records
    kept = [r for r in raw if r["chosen"] != r["rejected"]]
    assert len(raw) == 2354 and len(records) == 2352 == len(kept)
    assert sum(dm.skip_stats["train"].values()) == 2
    assert "chosen == rejected" in next(iter(dm.skip_stats["train"]))
    for record, row in zip(records, kept, strict=True):
        assert record["prompt"].endswith("\n\nAssistant:")
        assert record["prompt"] + record["chosen"] == row["chosen"]
        assert record["prompt"] + record["rejected"] == row["rejected"]
        assert "\n\nHuman:" not in record["chosen"] and "\n\nHuman:" not in record["rejected"]
    # helpful-base row 1167: the chosen answer itself contains "\n\nAssistant:"; the prompt is the shared one.
    row = raw[1166]
    record = next(r for r in records if r["prompt"] + r["rejected"] == row["rejected"])
    assert record["chosen"].startswith(" Umm. Just a second...\n\nAssistant:")


def test_hh_real_all_subsets_counts(shared_data, tokenizer):
    dm = HHDataModule(data_path=str(shared_data / "hh_rlhf"), train_split="test", val_split=None)
    dm.attach(tokenizer, "prompt").setup()
    assert len(dm.dataset("train")) == 2312 + 2352  # harmless-base has no chosen == rejected rows


# ---- validation errors ------------------------------------------------------------------------------------


GOOD = [hh_row(1), hh_row(2)]
HH_BAD_ROWS = [
    ({"chosen": hh_row(3)["chosen"]}, "field 'rejected'", "expected a non-empty string, got missing or null"),
    ({"chosen": 5, "rejected": hh_row(3)["rejected"]}, "field 'chosen'", "got int"),
    ({"chosen": "", "rejected": hh_row(3)["rejected"]}, "field 'chosen'", "got an empty string"),
    (
        {"chosen": "\n\nHuman: hi", "rejected": hh_row(3)["rejected"]},
        "field 'chosen'",
        "no '\\n\\nAssistant:'",
    ),
    (
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        "field 'rejected'",
        "mismatched prefix",
    ),
    (hh_row(3, chosen=""), "field 'chosen'", "empty final Assistant answer"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("bad,field,detail", HH_BAD_ROWS)
def test_hh_bad_row_names_file_row_field(tmp_path, bad, field, detail, suffix):
    path = write_jsonl(tmp_path / "hh" / f"test{suffix}", [*GOOD, bad])
    dm = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", val_split=None)
    with pytest.raises(DataValidationError) as info:
        dm.setup()  # validation needs no tokenizer: bad rows fail before any module is attached
    message = str(info.value)
    assert message.startswith(f"{path}: row 3: {field}"), message
    assert detail in message


def test_bad_json_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "hh" / "test.jsonl.gz", [*GOOD, GOOD[0], GOOD[1]], raw_lines={4: '{"chosen": '})
    dm = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", val_split=None)
    with pytest.raises(DataValidationError, match="invalid JSON") as info:
        dm.setup()
    assert str(info.value).startswith(f"{path}: row 4:")


def test_unreadable_file_names_file(tmp_path):
    path = tmp_path / "hh" / "test.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(b"\x1f\x8b\x08garbage")
    dm = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", val_split=None)
    with pytest.raises(DataValidationError) as info:
        dm.setup()
    assert str(info.value).startswith(str(path))


def test_invalid_configuration_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length"):
        HHDataModule(data_path=str(tmp_path), max_length=64, max_prompt_length=64)
    dm = hh_dm(tmp_path, GOOD, tokenizer)
    with pytest.raises(ValueError, match="prompt.*pair.*unpaired.*text"):
        dm.attach(tokenizer, "dpo")
    no_tok = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", val_split=None)
    with pytest.raises(ValueError, match="tokenizer"):
        no_tok.attach(None, "pair")
    no_tok.setup()  # reading and validating needs no tokenizer ...
    assert no_tok.has_split("train") and not no_tok.has_split("val") and no_tok.data_mode is None
    unattached = r"call dm\.attach\(tokenizer, data_mode\) or fit it with a lit-align module"
    probe = lambda: no_tok.probe_batch("train", "pair", 1)  # noqa: E731
    for use in (lambda: no_tok.dataset("train"), no_tok.train_dataloader, probe):
        with pytest.raises(NotAttachedError, match=unattached):
            use()  # ... but batches do
    with pytest.raises(ValueError, match="no data mode"):
        no_tok.attach(tokenizer)  # data_mode may be omitted only when the datamodule has mode=


# ---- the four modes' batches ------------------------------------------------------------------------------


ROWS = [
    hh_row(1),
    hh_row(22, chosen=" Short.", rejected=" A considerably longer rejected answer with many more words in it."),
    hh_row(333, chosen=" A long chosen answer, long enough to be the longest of the batch by far, really."),
    hh_row(4),
    hh_row(5),
]


def test_prompt_mode_left_pads(tmp_path, tokenizer):
    dm = hh_dm(tmp_path, ROWS, tokenizer, mode="prompt", batch_size=5)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {PROMPT_INPUT_IDS, PROMPT_ATTENTION_MASK, "prompt", "reference", INDEX}
    ids, mask = batch[PROMPT_INPUT_IDS], batch[PROMPT_ATTENTION_MASK]
    assert mask[:, -1].all() and not mask[:, 0].all()  # lengths differ, so some rows are padded on the left
    assert (mask.diff(dim=1) >= 0).all()  # 0...0 1...1 in every row
    for i in range(len(ROWS)):
        assert tokenizer.decode(masked(ids[i], mask[i])) == batch["prompt"][i]
        j = batch[INDEX][i].item()
        record = dm.dataset("train").records[j]
        assert batch["prompt"][i] == record["prompt"] and batch["reference"][i] == record["reference"]
        assert ROWS[j]["chosen"] == record["prompt"] + record["reference"]


def test_pair_mode_common_length_and_completion_masks(tmp_path, tokenizer):
    dm = hh_dm(tmp_path, ROWS, tokenizer, mode="pair", batch_size=5, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch[CHOSEN_INPUT_IDS].shape == batch[REJECTED_INPUT_IDS].shape
    assert batch[INDEX].tolist() == [0, 1, 2, 3, 4]
    eos = tokenizer.eos_token
    for side, ids_key, att_key, comp_key in (
        ("chosen", CHOSEN_INPUT_IDS, CHOSEN_ATTENTION_MASK, CHOSEN_COMPLETION_MASK),
        ("rejected", REJECTED_INPUT_IDS, REJECTED_ATTENTION_MASK, REJECTED_COMPLETION_MASK),
    ):
        ids, att, comp = batch[ids_key], batch[att_key], batch[comp_key]
        assert (att.diff(dim=1) <= 0).all()  # right-padded
        assert ((comp == 1) <= (att == 1)).all()  # completion tokens are real tokens
        for i, row in enumerate(ROWS):
            completion = batch[side][i]
            assert tokenizer.decode(masked(ids[i], comp[i])) == completion + eos
            assert masked(ids[i], comp[i])[-1] == tokenizer.eos_token_id
            prompt_part = masked(ids[i], att[i] * (1 - comp[i]))
            assert tokenizer.decode(prompt_part) == batch["prompt"][i]
            assert batch["prompt"][i] + completion == row[side]
    assert (batch[CHOSEN_ATTENTION_MASK].sum(1) + batch[REJECTED_ATTENTION_MASK].sum(1)).max() > 0


def test_unpaired_mode_labels_kl_rotation_and_shuffle(tmp_path, tokenizer):
    rows = [hh_row(i) for i in range(20)]
    dm = hh_dm(tmp_path, rows, tokenizer, mode="unpaired", batch_size=4)
    dm.setup()
    data = dm.dataset("train")
    assert len(data) == 40
    assert sum(r["label"] for r in data.records) == 20
    adjacent = sum(a["prompt"] == b["prompt"] for a, b in zip(data.records, data.records[1:], strict=False))
    assert adjacent < 10  # pair order interleaved would make 20 adjacent pairs
    for record in data.records:
        row = rows[int(record["prompt"].split("number ")[1].split("?")[0])]
        assert record["prompt"] + record["completion"] == row["chosen" if record["label"] else "rejected"]
    batch = next(iter(dm.dataloader("train", batch_size=6)))
    assert batch[LABEL].dtype == torch.bool
    eos = tokenizer.eos_token
    for i in range(6):
        record = data.records[batch[INDEX][i].item()]
        assert batch[LABEL][i].item() == record["label"]
        assert tokenizer.decode(masked(batch[INPUT_IDS][i], batch[COMPLETION_MASK][i])) == record["completion"] + eos
        assert batch[ATTENTION_MASK][i].sum() > batch[COMPLETION_MASK][i].sum()
        # KL example i = (prompt_i, completion_{i-1})
        kl_ids, kl_att, kl_comp = (
            batch[KL_INPUT_IDS][i],
            batch[KL_ATTENTION_MASK][i],
            batch[KL_COMPLETION_MASK][i],
        )
        assert tokenizer.decode(masked(kl_ids, kl_comp)) == batch["completion"][i - 1] + eos
        assert tokenizer.decode(masked(kl_ids, kl_att * (1 - kl_comp))) == batch["prompt"][i]


def test_unpaired_batch_of_one_is_an_error_and_is_dropped(tmp_path, tokenizer):
    dm = hh_dm(tmp_path, ROWS, tokenizer, mode="unpaired", batch_size=4)  # 10 unpaired rows
    dm.setup()
    item = dm.dataset("train")[0]
    with pytest.raises(ValueError, match=">= 2 rows"):
        Collator("unpaired", tokenizer.pad_token_id, 512)([item])
    sizes = [len(b[INDEX]) for b in dm.dataloader("train", batch_size=3)]  # 10 = 3 + 3 + 3 + 1
    assert sizes == [3, 3, 3] and dm.dropped_rows["train"] == 1
    sizes = [len(b[INDEX]) for b in dm.dataloader("train", batch_size=4)]  # remainder 2 is kept
    assert sizes == [4, 4, 2] and dm.dropped_rows["train"] == 0
    sizes = [len(b[INDEX]) for b in dm.train_dataloader()]  # the train loader drops any partial batch
    assert sizes == [4, 4] and dm.dropped_rows["train"] == 2
    with pytest.raises(ValueError, match=">= 2 rows"):
        hh_dm(tmp_path, ROWS, tokenizer, mode="unpaired", batch_size=1).setup()


def test_text_mode_from_pairs(tmp_path, tokenizer):
    dm = hh_dm(tmp_path, ROWS, tokenizer, mode="text", batch_size=5, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    for i, row in enumerate(ROWS):
        assert batch["text"][i] == row["chosen"]
        ids, att, comp = batch[INPUT_IDS][i], batch[ATTENTION_MASK][i], batch[COMPLETION_MASK][i]
        assert tokenizer.decode(masked(ids, comp)) == row["chosen"][len(batch["prompt"][i]) :] + tokenizer.eos_token
        assert tokenizer.decode(masked(ids, att)) == row["chosen"] + tokenizer.eos_token


class PlainTextDataModule(BenchmarkDataModule):
    """A native ``text`` benchmark: one ``{text}`` per row."""

    native_mode = "text"

    def parse_row(self, row: dict, where: str) -> dict:
        return {"text": require_str(row, "text", where)}


def test_text_mode_plain_text_records(tmp_path, tokenizer):
    texts = ["A short line.", "A somewhat longer line of plain text."]
    write_jsonl(tmp_path / "t" / "train.jsonl", [{"text": t} for t in texts])
    dm = PlainTextDataModule(data_path=str(tmp_path / "t"), val_split=None, shuffle=False)
    dm.attach(tokenizer, "text").setup()
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch[COMPLETION_MASK], batch[ATTENTION_MASK])  # every real token is trained on
    for i, text in enumerate(texts):
        assert batch["text"][i] == text
        assert tokenizer.decode(masked(batch[INPUT_IDS][i], batch[COMPLETION_MASK][i])) == text + tokenizer.eos_token
    with pytest.raises(ValueError, match="cannot serve mode 'pair'"):
        dm.attach(tokenizer, "pair").dataset("train")


def test_setup_then_attach_builds_lazily_and_is_idempotent(tmp_path, tokenizer):
    write_jsonl(tmp_path / "hh" / "test.jsonl", ROWS)
    dm = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", holdout=2)
    dm.trainer = SimpleNamespace(world_size=1)
    dm.setup("fit")  # Lightning's order: datamodule.setup, then LightningModule.setup attaches
    assert dm.truncation_stats == {} and sum(dm.skip_stats["train"].values()) == 0  # read, not tokenized
    assert dm.attach(tokenizer, "prompt") is dm
    first = dm.dataset("train")
    dm.setup("validate")
    dm.attach(tokenizer, "prompt")
    assert dm.dataset("train") is first and dm.data_mode == "prompt"
    assert len(dm.dataset("val")) == 2 and len(dm.dataset("test")) == 2
    dm.attach(tokenizer, "pair")  # another mode: rebuilt on first use, from the same records
    assert dm.data_mode == "pair" and dm.dataset("train") is not first
    assert [r["prompt"] for r in dm.dataset("train").records] == [r["prompt"] for r in first.records]
    override = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", holdout=2, mode="pair")
    override.trainer = dm.trainer
    override.setup("fit")
    override.attach(tokenizer, "prompt")  # the datamodule's own mode= wins over the attached data_mode
    assert override.data_mode == "pair" and override.dataset("train").mode == "pair"


class TokenizerPromptDataModule(BenchmarkDataModule):
    """A benchmark whose parse_row reads the tokenizer but forgot to declare parse_needs_tokenizer."""

    native_mode = "text"

    def parse_row(self, row: dict, where: str) -> dict:
        return {"text": self.tokenizer.eos_token + require_str(row, "text", where)}


def test_parse_row_reading_an_unattached_tokenizer_is_a_clear_error(tmp_path, tokenizer):
    write_jsonl(tmp_path / "t" / "train.jsonl", [{"text": "A line."}])
    dm = TokenizerPromptDataModule(data_path=str(tmp_path / "t"), val_split=None)
    with pytest.raises(NotAttachedError, match="declare parse_needs_tokenizer = True"):
        dm.setup()

    class Declared(TokenizerPromptDataModule):
        parse_needs_tokenizer = True

    declared = Declared(data_path=str(tmp_path / "t"), val_split=None)
    declared.setup()  # reads the file only; rows are parsed once a tokenizer is attached
    assert declared.attach(tokenizer, "text").dataset("train").records == [{"text": tokenizer.eos_token + "A line."}]


# ---- truncation ----------------------------------------------------------------------------------


def test_truncation_keeps_prompt_tail_and_completion_head(tmp_path, tokenizer):
    # " x" and " one" are single tokens; "\n\nAssistant:" ends every prompt.
    long_prompt = "\n\nHuman:" + " x" * 30 + "\n\nAssistant:"
    short_prompt = "\n\nHuman: hi\n\nAssistant:"
    long_answer, short_answer = " one" * 30, " ok"
    rows = [
        {"chosen": short_prompt + short_answer, "rejected": short_prompt + " no"},  # fits
        {"chosen": long_prompt + short_answer, "rejected": long_prompt + " no"},  # prompt cut
        {"chosen": short_prompt + long_answer, "rejected": short_prompt + " no"},  # chosen cut
        {"chosen": long_prompt + short_answer, "rejected": long_prompt + long_answer},  # both cut
    ]
    n_short = len(tokenizer(short_prompt, add_special_tokens=False).input_ids)
    dm = hh_dm(tmp_path, rows, tokenizer, max_length=24, max_prompt_length=16, shuffle=False, batch_size=4)
    dm.setup()
    data = dm.dataset("train")  # tokenized (and counted) on first use
    items = [data[i] for i in range(len(data))]
    assert dm.truncation_stats["train"] == {"rows": 4, "prompt_truncated": 2, "completion_truncated": 2}
    for item in (items[1], items[3]):
        assert len(item["prompt_ids"]) == 16
        kept = tokenizer.decode(item["prompt_ids"])
        assert long_prompt.endswith(kept) and kept.endswith(" x\n\nAssistant:")
    assert items[0]["chosen_ids"][-1] == tokenizer.eos_token_id  # untouched rows keep their EOS
    assert items[2]["chosen_ids"] == tokenizer(" one", add_special_tokens=False).input_ids * (24 - n_short)
    assert items[3]["rejected_ids"] == tokenizer(" one", add_special_tokens=False).input_ids * 8
    assert tokenizer.decode(items[3]["chosen_ids"]) == short_answer + tokenizer.eos_token
    batch = next(iter(dm.train_dataloader()))
    assert batch[CHOSEN_INPUT_IDS].shape[1] <= 24


# ---- holdout and limits --------------------------------------------------------------------------


def prompts_of(dm: BenchmarkDataModule, split: str) -> list[str]:
    return [r["prompt"] for r in dm.dataset(split).records]


def test_holdout_and_limits_are_disjoint_and_deterministic(tmp_path, tokenizer):
    rows = [hh_row(i) for i in range(30)]
    all_prompts = {hh_row(i)["chosen"].rsplit(" Here", 1)[0] for i in range(30)}
    dm = hh_dm(tmp_path, rows, tokenizer, holdout=6, val_split="test")
    dm.setup()
    train, val = prompts_of(dm, "train"), prompts_of(dm, "val")
    assert len(train) == 24 and len(val) == 6
    assert not set(train) & set(val) and set(train) | set(val) == all_prompts
    again = hh_dm(tmp_path, rows, tokenizer, holdout=6)
    again.setup()
    assert prompts_of(again, "train") == train and prompts_of(again, "val") == val
    other = hh_dm(tmp_path, rows, tokenizer, holdout=6, seed=1)
    other.setup()
    assert prompts_of(other, "val") != val
    limited = hh_dm(tmp_path, rows, tokenizer, holdout=6, limit_train=5, limit_val=2)
    limited.setup()
    assert prompts_of(limited, "train") == train[:5] and prompts_of(limited, "val") == val[:2]
    only_limit = hh_dm(tmp_path, rows, tokenizer, limit_train=7)
    only_limit.setup()
    assert len(prompts_of(only_limit, "train")) == 7 and not only_limit.has_split("val")
    assert only_limit.val_dataloader() == []
    with pytest.raises(ValueError, match="holdout"):
        hh_dm(tmp_path, rows, tokenizer, holdout=30).setup()


def test_shuffle_seed_changes_only_the_training_order(tmp_path, tokenizer):
    """A sweep's seeds vary the order of the same training rows; the holdout and the row set stay put."""
    rows = [hh_row(i) for i in range(30)]

    def order(**kwargs) -> tuple[list[int], list[str]]:
        dm = hh_dm(tmp_path, rows, tokenizer, holdout=6, batch_size=4, **kwargs)
        dm.setup()
        return [i for batch in dm.train_dataloader() for i in batch[INDEX].tolist()], prompts_of(dm, "val")

    base, base_val = order()
    assert order(shuffle_seed=0) == (base, base_val)  # the default is ``seed``
    other, other_val = order(shuffle_seed=1)
    assert other_val == base_val and sorted(other) == sorted(base) and other != base


# ---- TL;DR -------------------------------------------------------------------------------------------------


def tldr_row(i: int, split: str, choice: int = 0, texts=(" first summary", " second summary")) -> dict:
    return {
        "info": {"id": f"t3_{i}", "post": f"Post body {i}.", "title": f"Title {i}", "subreddit": "tifu"},
        "split": split,
        "summaries": [{"text": texts[0], "policy": "a"}, {"text": texts[1], "policy": "b"}],
        "choice": choice,
    }


def test_tldr_fixture_parsing_and_split_selection(tmp_path, tokenizer):
    rows = [
        tldr_row(0, "valid2", 0),
        tldr_row(1, "valid1", 1),
        tldr_row(2, "valid2", 1),
        tldr_row(3, "valid2", 0, texts=(" same", " same")),
    ]
    path = write_jsonl(tmp_path / "batch1.jsonl.gz", rows)
    dm = TLDRDataModule(data_path=str(path), train_split="valid2", val_split="valid1")
    dm.attach(tokenizer, "pair").setup()
    train, val = dm.dataset("train").records, dm.dataset("val").records
    assert train[0] == {
        "prompt": "SUBREDDIT: r/tifu\nTITLE: Title 0\nPOST: Post body 0.\nTL;DR:",
        "chosen": " first summary",
        "rejected": " second summary",
    }
    assert (train[1]["chosen"], train[1]["rejected"]) == (" second summary", " first summary")
    assert len(train) == 2 and sum(dm.skip_stats["train"].values()) == 1
    assert [r["prompt"] for r in val] == ["SUBREDDIT: r/tifu\nTITLE: Title 1\nPOST: Post body 1.\nTL;DR:"]
    with pytest.raises(ValueError, match="valid2"):
        TLDRDataModule(data_path=str(path)).attach(tokenizer, "pair").setup()


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda r: r.update(choice=2), "field 'choice'"),
        (lambda r: r.update(choice="1"), "field 'choice'"),
        (lambda r: r["info"].pop("title"), "field 'info.title'"),
        (lambda r: r["summaries"].pop(), "field 'summaries'"),
        (lambda r: r["summaries"][1].update(text=None), "field 'summaries[1].text'"),
    ],
)
def test_tldr_bad_rows(tmp_path, change, field):
    bad = tldr_row(2, "valid2")
    change(bad)
    path = write_jsonl(tmp_path / "b.jsonl", [tldr_row(0, "valid2"), tldr_row(1, "valid2"), bad])
    dm = TLDRDataModule(data_path=str(path), train_split="valid2", val_split=None)
    with pytest.raises(DataValidationError) as info:
        dm.setup()
    assert str(info.value).startswith(f"{path}: row 3: {field}"), str(info.value)


def test_tldr_real_file(shared_data, tokenizer):
    path = shared_data / "tldr_comparisons" / "batch13.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    dm = TLDRDataModule(data_path=str(path), train_split="valid2", val_split="valid1")
    dm.attach(tokenizer, "pair").setup()
    assert len(dm.dataset("train")) == 832 and len(dm.dataset("val")) == 265
    record = (dm.dataset("train") if first["split"] == "valid2" else dm.dataset("val")).records[0]
    info = first["info"]
    assert record["prompt"] == f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"
    assert record["chosen"] == first["summaries"][first["choice"]]["text"]
    assert record["rejected"] == first["summaries"][1 - first["choice"]]["text"]


# ---- UltraFeedback -----------------------------------------------------------------------------------------


def uf_row(i: int, good: str = "Good answer.", bad: str = "Bad answer.") -> dict:
    question = f"What is {i} + {i}?"
    user = {"role": "user", "content": question}
    return {
        "prompt": question,
        "chosen": [dict(user), {"role": "assistant", "content": good}],
        "rejected": [dict(user), {"role": "assistant", "content": bad}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }


def test_ultrafeedback_chat_template_and_plain(tmp_path, tokenizer):
    write_jsonl(tmp_path / "uf" / "train_prefs.jsonl", [uf_row(1), uf_row(2), uf_row(3, "Same.", "Same.")])
    write_jsonl(tmp_path / "uf" / "test_prefs.jsonl.gz", [uf_row(4)])
    dm = UltraFeedbackDataModule(data_path=str(tmp_path / "uf")).attach(tokenizer, "pair")
    dm.setup()
    record = dm.dataset("train").records[0]
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 1?"}], tokenize=False, add_generation_prompt=True
    )
    assert record == {"prompt": expected, "chosen": "Good answer.", "rejected": "Bad answer."}
    assert record["prompt"].endswith("<|im_start|>assistant\n")
    assert len(dm.dataset("train")) == 2 and sum(dm.skip_stats["train"].values()) == 1
    assert len(dm.dataset("val")) == 1

    plain_tok = copy.deepcopy(tokenizer)
    plain_tok.chat_template = None
    plain = UltraFeedbackDataModule(data_path=str(tmp_path / "uf"), val_split=None)
    plain.attach(plain_tok, "pair").setup()
    assert plain.dataset("train").records[0] == {
        "prompt": "\n\nHuman: What is 1 + 1?\n\nAssistant:",
        "chosen": " Good answer.",
        "rejected": " Bad answer.",
    }


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda r: r["chosen"].pop(), "field 'chosen': the last message must be the assistant"),
        (lambda r: r["rejected"][0].update(content="Another question"), "field 'rejected'"),
        (lambda r: r.update(chosen="text"), "field 'chosen': expected a list"),
        (lambda r: r["rejected"][1].update(content=3), "field 'rejected[1].content'"),
        (lambda r: r.pop("prompt"), "field 'prompt'"),
    ],
)
def test_ultrafeedback_bad_rows(tmp_path, tokenizer, change, field):
    bad = uf_row(3)
    change(bad)
    path = write_jsonl(tmp_path / "uf.jsonl", [uf_row(1), uf_row(2), bad])
    dm = UltraFeedbackDataModule(data_path=str(path), val_split=None)
    with pytest.raises(DataValidationError) as info:
        dm.attach(tokenizer, "pair").setup()
    assert str(info.value).startswith(f"{path}: row 3: {field}"), str(info.value)


def test_single_file_without_holdout_has_no_val_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "uf.jsonl", [uf_row(1), uf_row(2)])
    dm = UltraFeedbackDataModule(data_path=str(path)).attach(tokenizer, "pair")
    with pytest.raises(ValueError, match="single file"):
        dm.setup()


def test_data_modes_constant():
    assert DATA_MODES == ("prompt", "pair", "unpaired", "text")


def test_trainer_fit_attaches_tokenizer_and_mode_from_module(tmp_path, tokenizer):
    import lightning as L

    class Probe(L.LightningModule):
        data_mode = "unpaired"

        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.sizes: list[int] = []

        def setup(self, stage):  # what AlignmentModule.setup does
            self.trainer.datamodule.attach(self.tokenizer, self.data_mode)

        def training_step(self, batch, batch_idx):
            assert {KL_INPUT_IDS, LABEL, INDEX} <= set(batch)
            self.sizes.append(len(batch[INDEX]))
            return self.weight * batch[COMPLETION_MASK].float().sum()

        def validation_step(self, batch, batch_idx):
            self.sizes.append(-len(batch[INDEX]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    write_jsonl(tmp_path / "hh" / "test.jsonl", ROWS)
    dm = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", holdout=2, batch_size=3)
    module = Probe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    # 3 pairs -> 6 unpaired train rows (batches of 3); 2 held-out pairs -> 4 val rows (3 + 1, the 1 dropped)
    assert sorted(module.sizes) == [-3, 3, 3] and dm.data_mode == "unpaired" and dm.dropped_rows["val"] == 1


def test_fit_with_a_lit_align_module_attaches_without_any_call(tmp_path):
    import lightning as L

    from lit_align import SFTModule

    write_jsonl(tmp_path / "hh" / "test.jsonl", ROWS)
    dm = HHDataModule(data_path=str(tmp_path / "hh"), train_split="test", val_split=None, batch_size=5)
    module = SFTModule(model="tiny-llama")
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1 and dm.data_mode == "text" and dm.tokenizer is module.tokenizer


def test_pad_left_right_and_fixed_width():
    rows = [[1, 2, 3], [4], []]
    assert pad(rows, 0, "right").tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad(rows, 9, "left").tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert pad(rows, 0, "right", width=5).tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert pad(rows, 7, "left", width=4).tolist() == [[7, 1, 2, 3], [7, 7, 7, 4], [7, 7, 7, 7]]
    assert pad(rows, 0).dtype == torch.long
