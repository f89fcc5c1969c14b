"""From canonical records to tensors: tokenization with truncation, the tokenized dataset, padding, collation.

Owns everything between a list of canonical records of one data mode (built by ``datamodules/base.py``) and a
batch (the keys of ``datamodules/keys.py``):

* ``tokenize_records``: ``tokenizer(text, add_special_tokens=False)``; completions (and ``{text}`` records) get
  ``tokenizer.eos_token_id`` appended, prompts do not. Prompt and completion are tokenized separately and
  concatenated, so a completion mask marks exactly the completion's own tokens. Truncation keeps the prompt's
  *tail* (at most ``max_prompt_length`` tokens) and then the completion's *head* (prompt + completion ≤
  ``max_length``; the EOS is dropped when it does not fit); the counts come back as truncation stats.
* ``TokenizedDataset``: the tokenized items of one split in one mode, with their records; item ``i`` has ``INDEX i``.
* ``pad``: the one padding helper (``torch.nn.utils.rnn.pad_sequence`` on either side, optionally to a fixed width).
* ``Collator``: pads a list of items into one batch — prompts left-padded (generation), prompt + completion rows
  right-padded with completion masks; pairs share one width; unpaired batches add TRL's mismatched KL rows.

No file reading, no Lightning: this module only needs a tokenizer and the records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
    INDEX,
    INPUT_IDS,
    KL_ATTENTION_MASK,
    KL_COMPLETION_MASK,
    KL_INPUT_IDS,
    LABEL,
    PROMPT,
    PROMPT_ATTENTION_MASK,
    PROMPT_INPUT_IDS,
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

    ``records`` holds the canonical records (before tokenization) in the same order.
    """

    def __init__(self, items: list[dict], records: list[dict], mode: str) -> None:
        self.items, self.records, self.mode = items, records, mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], INDEX: i}


# ---- tokenization and truncation --------------------------------------------------------------------------


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_records(
    records: list[dict], mode: str, tokenizer: Any, max_length: int, max_prompt_length: int
) -> tuple[TokenizedDataset, dict[str, int]]:
    """Tokenize and truncate ``records`` of data mode ``mode``.

    Returns the dataset and its truncation stats ``{rows, prompt_truncated, completion_truncated}``.
    """
    eos = tokenizer.eos_token_id
    stats = {"rows": len(records), "prompt_truncated": 0, "completion_truncated": 0}
    items: list[dict] = []
    if mode == "text" and TEXT in records[0]:
        texts = [r[TEXT] for r in records]
        for text, ids in zip(texts, _encode(tokenizer, texts), strict=True):
            ids = ids + [eos]
            if len(ids) > max_length:
                ids = ids[:max_length]
                stats["completion_truncated"] += 1
            items.append({"prompt_ids": [], "completion_ids": ids, TEXT: text})
    else:
        prompts = _encode(tokenizer, [r[PROMPT] for r in records])
        for i, ids in enumerate(prompts):
            if len(ids) > max_prompt_length:
                prompts[i] = ids[len(ids) - max_prompt_length :]
                stats["prompt_truncated"] += 1
        fields = {"pair": (CHOSEN, REJECTED), "unpaired": (COMPLETION,), "text": (COMPLETION,)}.get(mode, ())
        encoded = {f: _encode(tokenizer, [r[f] for r in records]) for f in fields}
        for i, (record, prompt_ids) in enumerate(zip(records, prompts, strict=True)):
            item = {"prompt_ids": prompt_ids, **record}
            budget = max_length - len(prompt_ids)
            cut = False
            for f in fields:
                ids = encoded[f][i] + [eos]
                cut |= len(ids) > budget
                item[f"{f}_ids"] = ids[:budget]
            stats["completion_truncated"] += cut
            if mode == "text":
                item[TEXT] = record[PROMPT] + record[COMPLETION]
            items.append(item)
    return TokenizedDataset(items, records, mode), stats


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


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad rows (prompts for generation); returns ids and attention mask."""
    return pad(seqs, pad_id, "left"), pad([[1] * len(s) for s in seqs], 0, "left")


# ---- collation ------------------------------------------------------------------------------------------------


class Collator:
    """Pads a list of tokenized items into a batch for one data mode (a picklable callable for workers)."""

    def __init__(self, mode: str, pad_id: int, max_length: int) -> None:
        self.mode, self.pad_id, self.max_length = mode, pad_id, max_length

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {INDEX: torch.tensor([it[INDEX] for it in items], dtype=torch.long)}
        prompts = [it["prompt_ids"] for it in items]
        if self.mode == "prompt":
            batch[PROMPT_INPUT_IDS], batch[PROMPT_ATTENTION_MASK] = _left_pad(prompts, self.pad_id)
            batch[PROMPT] = [it[PROMPT] for it in items]
            if all(REFERENCE in it for it in items):
                batch[REFERENCE] = [it[REFERENCE] for it in items]
            # benchmark-specific strings (e.g. a second-leg reference) travel with the batch too
            for key in items[0]:
                if key.startswith(REFERENCE + "_") and all(isinstance(it.get(key), str) for it in items):
                    batch[key] = [it[key] for it in items]
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
