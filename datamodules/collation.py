"""From canonical records to tensors: tokenization with truncation, the tokenized dataset, padding, collation.

Owns everything between a list of canonical records of one data mode (built by ``datamodules/base.py``) and a
batch (the keys of ``datamodules/keys.py``):

* ``tokenize_records``: ``tokenizer(text, add_special_tokens=False)``; completions (and ``{text}`` records) get
  ``tokenizer.eos_token_id`` appended, prompts do not. Prompt and completion are tokenized separately and
  concatenated, so a completion mask marks exactly the completion's own tokens. Truncation keeps the prompt's
  *tail* (at most ``max_prompt_length`` tokens) and then the completion's *head* (prompt + completion ≤
  ``max_length``; the EOS is dropped when it does not fit); the counts come back as truncation stats.
* ``TokenizedDataset``: the tokenized items of one split in one mode, with their records; item ``i`` has ``INDEX i``.
* ``pad`` / ``pad_rows``: the one padding helper (``torch.nn.utils.rnn.pad_sequence`` on either side, optionally to a
  fixed width; ``pad_rows`` adds the attention mask), also used by ``lit_align`` (perplexity, rewards).
* ``Collator``: pads a list of items into one batch — prompts left-padded (generation), prompt + completion rows
  right-padded with completion masks; pairs share one width; unpaired batches add TRL's mismatched KL rows.

No file reading, no Lightning: this module only needs a tokenizer and the records.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from datasets.fingerprint import Hasher
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from datamodules.keys import (
    ATTENTION_MASK,
    CHOSEN,
    CHOSEN_ATTENTION_MASK,
    CHOSEN_COMPLETION_MASK,
    CHOSEN_INPUT_IDS,
    COMPLETION,
    COMPLETION_MASK,
    DATA_MODES,
    EXTRA_COLUMNS,
    INDEX,
    INPUT_IDS,
    KL_ATTENTION_MASK,
    KL_COMPLETION_MASK,
    KL_INPUT_IDS,
    LABEL,
    PROMPT,
    PROMPT_ATTENTION_MASK,
    PROMPT_INPUT_IDS,
    PROMPT_MESSAGES,
    REFERENCE,
    REJECTED,
    REJECTED_ATTENTION_MASK,
    REJECTED_COMPLETION_MASK,
    REJECTED_INPUT_IDS,
    TEXT,
)

# ---- the tokenized dataset ------------------------------------------------------------------------------


class TokenizedDataset(Dataset):
    """Tokenized examples of one split in one mode; item ``i`` carries ``index = i``.

    ``records`` holds the canonical records (before tokenization) in the same order; ``table`` is the
    ``datasets.Dataset`` of their token ids (``prompt_ids`` and ``<field>_ids``), memory-mapped when it came from
    the on-disk cache. ``source`` says which: ``"tokenized"`` or ``"cache"``.
    """

    def __init__(self, table: datasets.Dataset, records: list[dict], mode: str, source: str = "tokenized") -> None:
        self.table, self.records, self.mode, self.source = table, records, mode, source
        self.token_columns = [c for c in table.column_names if c.endswith("_ids")]
        self._tokens = table.select_columns(self.token_columns)  # once, not per item: the loaders' hot path

    def __len__(self) -> int:
        return len(self.records)

    def _item(self, i: int, tokens: dict[str, list[int]]) -> dict:
        record = self.records[i]
        item = {**record, **tokens, INDEX: i}
        if self.mode == "text" and TEXT not in record:
            item[TEXT] = record[PROMPT] + record[COMPLETION]
        return item

    def __getitem__(self, i: int) -> dict:
        return self._item(i, self._tokens[i])

    def lengths(self) -> list[int]:
        """The padded width each row needs: prompt + its longest completion field (a pair's chosen and rejected
        share one padded batch). Computed in Arrow, without reading rows into Python."""
        table = self._tokens.with_format("arrow")[:]
        sizes = {c: pc.list_value_length(table.column(c)).fill_null(0) for c in self.token_columns}
        prompt = sizes.pop("prompt_ids", None)
        longest = None
        for size in sizes.values():
            longest = size if longest is None else pc.max_element_wise(longest, size)
        total = longest if prompt is None else prompt if longest is None else pc.add(prompt, longest)
        return total.to_pylist() if total is not None else [0] * len(self)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch in one Arrow read (the DataLoader's batched fetch)."""
        columns = self._tokens[indices]
        return [self._item(i, {c: columns[c][k] for c in self.token_columns}) for k, i in enumerate(indices)]


# ---- tokenization and truncation --------------------------------------------------------------------------

# Bump when what ``tokenize_columns`` computes changes: old cache entries then stop matching.
TOKENIZATION_VERSION = 1
_FIELDS = {"pair": (CHOSEN, REJECTED), "unpaired": (COMPLETION,), "text": (COMPLETION,)}


def texts_to_tokenize(records: list[dict], mode: str) -> dict[str, list[str]]:
    """The string columns tokenization reads: ``{text}`` for text records, else the prompt and the mode's
    completion fields."""
    if mode == "text" and TEXT in records[0]:
        return {TEXT: [r[TEXT] for r in records]}
    return {key: [r[key] for r in records] for key in (PROMPT, *_FIELDS.get(mode, ()))}


def tokenize_columns(
    batch: dict[str, list[str]], tokenizer: Any, max_length: int, max_prompt_length: int
) -> dict[str, list]:
    """The ``datasets.map`` function (batched): token ids per column, truncated, with per-row truncation flags."""
    eos = tokenizer.eos_token_id
    if TEXT in batch:
        ids = [row + [eos] for row in tokenizer(batch[TEXT], add_special_tokens=False)["input_ids"]]
        return {
            "prompt_ids": [[] for _ in ids],
            "completion_ids": [row[:max_length] for row in ids],
            "prompt_truncated": [False] * len(ids),
            "completion_truncated": [len(row) > max_length for row in ids],
        }
    prompts = tokenizer(batch[PROMPT], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {
        "prompt_ids": [row[len(row) - max_prompt_length :] if len(row) > max_prompt_length else row for row in prompts],
        "prompt_truncated": [len(row) > max_prompt_length for row in prompts],
        "completion_truncated": [False] * len(prompts),
    }
    for field in (key for key in batch if key != PROMPT):
        cut = out["completion_truncated"]
        rows = []
        for i, row in enumerate(tokenizer(batch[field], add_special_tokens=False)["input_ids"]):
            budget = max_length - len(out["prompt_ids"][i])
            row = row + [eos]
            cut[i] = cut[i] or len(row) > budget
            rows.append(row[:budget])
        out[f"{field}_ids"] = rows
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the token ids: the full tokenizer definition and its EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else Hasher.hash(tokenizer)
    return hashlib.blake2b(f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{definition}".encode()).hexdigest()


def tokenization_key(
    texts: dict[str, list[str]], mode: str, tokenizer: Any, max_length: int, max_prompt_length: int
) -> str:
    """The cache key: the texts, the mode, the tokenizer and the truncation settings (and the code's version)."""
    digest = hashlib.blake2b(digest_size=20)
    settings = (TOKENIZATION_VERSION, mode, max_length, max_prompt_length, tokenizer_fingerprint(tokenizer))
    digest.update(repr(settings).encode())
    for name, values in texts.items():
        digest.update(name.encode())
        digest.update(pickle.dumps(values, protocol=5))
    return digest.hexdigest()


def default_cache_dir() -> str:
    """``<the datasets cache>/lit_align_tokenized`` (``HF_DATASETS_CACHE``, else ``~/.cache/huggingface/datasets``)."""
    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "lit_align_tokenized")


def tokenize_records(
    records: list[dict],
    mode: str,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> tuple[TokenizedDataset, dict[str, int]]:
    """Tokenize and truncate ``records`` of data mode ``mode`` with ``datasets.map`` (batched, ``num_proc``).

    With a ``cache_dir`` the result is saved there under ``tokenization_key`` and later calls with the same texts,
    tokenizer and settings load it (memory-mapped) instead of tokenizing again. Returns the dataset and its
    truncation stats ``{rows, prompt_truncated, completion_truncated}``.
    """
    texts = texts_to_tokenize(records, mode)
    key = tokenization_key(texts, mode, tokenizer, max_length, max_prompt_length)
    path = os.path.join(cache_dir, key) if cache_dir is not None else None
    if path is not None and os.path.isdir(path):
        table, source = datasets.load_from_disk(path), "cache"
    else:
        table = datasets.Dataset.from_dict(texts).map(
            tokenize_columns,
            batched=True,
            batch_size=1000,
            num_proc=num_proc if num_proc and num_proc > 1 and len(records) >= 2 * num_proc else None,
            remove_columns=list(texts),
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "max_prompt_length": max_prompt_length},
            new_fingerprint=key,
            desc=f"tokenizing {len(records)} {mode} rows",
        )
        source = "tokenized"
        if path is not None:
            _save_atomically(table, path)
    stats = {"rows": len(records)}
    for flag in ("prompt_truncated", "completion_truncated"):  # summed in Arrow: no Python row objects
        stats[flag] = int(pc.sum(table.data.column(flag)).as_py() or 0)
    return TokenizedDataset(table, records, mode, source), stats


def _save_atomically(table: datasets.Dataset, path: str) -> None:
    """Write to a fresh directory beside ``path`` and rename it into place: a reader never sees half a cache entry,
    and when two processes race the first rename wins."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".writing-")
    try:
        table.save_to_disk(staging)
        os.replace(staging, path)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- padding ------------------------------------------------------------------------------------------------


def pad(rows: Sequence[Sequence[int]], value: int, side: str = "right", width: int | None = None) -> torch.Tensor:
    """Stack token rows into a LongTensor ``[B, W]``, padded with ``value`` on ``side`` ("left" or "right").

    ``W`` is the longest row, or ``width`` when that is larger (e.g. a pair's common width).
    """
    tensors = [torch.tensor(list(row), dtype=torch.long) for row in rows]
    out = pad_sequence(tensors, batch_first=True, padding_value=value, padding_side=side)
    if width is not None and width > out.shape[1]:
        extra = width - out.shape[1]
        out = F.pad(out, (extra, 0) if side == "left" else (0, extra), value=value)
    return out


def _right_pad(
    prefixes: Sequence[list[int]], suffixes: Sequence[list[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``prefix + suffix`` rows; returns ids, attention mask, and a mask of the suffix tokens."""
    pairs = list(zip(prefixes, suffixes, strict=True))
    ids = pad([list(p) + list(s) for p, s in pairs], pad_id, "right", length)
    attention = pad([[1] * (len(p) + len(s)) for p, s in pairs], 0, "right", length)
    completion = pad([[0] * len(p) + [1] * len(s) for p, s in pairs], 0, "right", length)
    return ids, attention, completion


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows → ``(input_ids, attention_mask)``, padded on ``side`` (left for generation prompts).

    The one padding helper outside the collator: held-out perplexity, learned rewards and the pivot translator use
    it too."""
    return pad(rows, pad_id, side), pad([[1] * len(row) for row in rows], 0, side)


# ---- collation ------------------------------------------------------------------------------------------------


class Collator:
    """Pads a list of tokenized items into a batch for one data mode (a picklable callable for workers)."""

    def __init__(self, mode: str, pad_id: int, max_length: int) -> None:
        self.mode, self.pad_id, self.max_length = mode, pad_id, max_length

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {INDEX: torch.tensor([it[INDEX] for it in items], dtype=torch.long)}
        prompts = [it["prompt_ids"] for it in items]
        if self.mode == "prompt":
            batch[PROMPT_INPUT_IDS], batch[PROMPT_ATTENTION_MASK] = pad_rows(prompts, self.pad_id, "left")
            batch[PROMPT] = [it[PROMPT] for it in items]
            if all(REFERENCE in it for it in items):
                batch[REFERENCE] = [it[REFERENCE] for it in items]
            # benchmark-specific strings (e.g. a second-leg reference) travel with the batch too
            for key in items[0]:
                if key.startswith(REFERENCE + "_") and all(isinstance(it.get(key), str) for it in items):
                    batch[key] = [it[key] for it in items]
            if all(PROMPT_MESSAGES in it for it in items):
                batch[PROMPT_MESSAGES] = [it[PROMPT_MESSAGES] for it in items]
            for key in items[0].get(EXTRA_COLUMNS, {}):  # your own data's other columns, for reward functions
                batch[key] = [it.get(EXTRA_COLUMNS, {}).get(key) for it in items]
        elif self.mode == "pair":
            chosen, rejected = [it["chosen_ids"] for it in items], [it["rejected_ids"] for it in items]
            width = max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True))
            batch[CHOSEN_INPUT_IDS], batch[CHOSEN_ATTENTION_MASK], batch[CHOSEN_COMPLETION_MASK] = _right_pad(
                prompts, chosen, self.pad_id, width
            )
            batch[REJECTED_INPUT_IDS], batch[REJECTED_ATTENTION_MASK], batch[REJECTED_COMPLETION_MASK] = _right_pad(
                prompts, rejected, self.pad_id, width
            )
            for key in (PROMPT, CHOSEN, REJECTED):
                batch[key] = [it[key] for it in items]
        elif self.mode == "unpaired":
            if len(items) < 2:
                raise ValueError(
                    f"KTO-style unpaired batches need >= 2 rows to build mismatched KL pairs "
                    f"(prompt_i, completion_(i-1)); got a batch of {len(items)}. Use batch_size >= 2 "
                    "(the datamodule's loaders drop a final batch of one row)."
                )
            completions = [it["completion_ids"] for it in items]
            batch[INPUT_IDS], batch[ATTENTION_MASK], batch[COMPLETION_MASK] = _right_pad(
                prompts, completions, self.pad_id
            )
            batch[LABEL] = torch.tensor([it[LABEL] for it in items], dtype=torch.bool)
            # KL example i = (prompt_i, completion_{i-1}), cut to fit max_length after prompt_i (TRL's
            # construction).
            rotated = [completions[i - 1][: self.max_length - len(prompts[i])] for i in range(len(items))]
            batch[KL_INPUT_IDS], batch[KL_ATTENTION_MASK], batch[KL_COMPLETION_MASK] = _right_pad(
                prompts, rotated, self.pad_id
            )
            batch[PROMPT] = [it[PROMPT] for it in items]
            batch[COMPLETION] = [it[COMPLETION] for it in items]
        elif self.mode == "text":
            completions = [it["completion_ids"] for it in items]
            batch[INPUT_IDS], batch[ATTENTION_MASK], batch[COMPLETION_MASK] = _right_pad(
                prompts, completions, self.pad_id
            )
            batch[TEXT] = [it[TEXT] for it in items]
            if all(PROMPT in it for it in items):
                batch[PROMPT] = [it[PROMPT] for it in items]
                batch[COMPLETION] = [it[COMPLETION] for it in items]
        else:  # pragma: no cover — modes are validated in attach
            raise ValueError(f"unknown data mode {self.mode!r}; expected one of {DATA_MODES}")
        return batch
