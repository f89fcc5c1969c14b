"""OpenAI "Learning to summarize from human feedback" TL;DR comparisons (Stiennon et al. 2020), mode ``pair``.

Row: ``{info: {post, title, subreddit, ...}, summaries: [{text, ...}, {text, ...}], choice: 0|1, split,
...}``. Prompt ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"``; chosen =
``summaries[choice].text``, rejected = the other (summary texts already start with a space). Pairs with
identical summary texts are skipped (counted, logged).

Splits are selected by each row's ``split`` field (``train``, ``valid1``, ``valid2``); ``"validation"`` means
``valid1`` + ``valid2``. Local data (``/work/shared/data/tldr_comparisons``) is a ``batch*.jsonl(.gz)`` file
or a directory of them and holds only validation batches, so for local runs use ``train_split: valid2,
val_split: valid1`` (upstream used valid1 for model selection, valid2 for final evaluation). On the Hub
(``openai/summarize_from_feedback``, config ``comparisons``) ``train`` / ``validation`` are the splits.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

from datamodules.base import BenchmarkDataModule
from datamodules.keys import CHOSEN, PROMPT, REJECTED
from datamodules.readers import (
    DataValidationError,
    RawRow,
    SkipRow,
    read_hub,
    read_json_file,
    require_str,
    require_type,
)

VALIDATION_SPLITS = ("valid1", "valid2")


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


class TLDRDataModule(BenchmarkDataModule):
    """TL;DR summarization comparisons from a local ``batch*.jsonl(.gz)`` file / directory or the Hub."""

    default_data_path = "openai/summarize_from_feedback"

    def __init__(self, train_split: str = "train", val_split: str | None = "validation", **kwargs: Any):
        """
        Args:
            train_split: rows whose ``split`` field equals this (``train``, ``valid1``, ``valid2``,
            ``validation``).
                Local files hold only ``valid1``/``valid2``: use ``train_split="valid2"``.
            val_split: likewise for validation (local: ``"valid1"``); ``None`` for none.
            **kwargs: ``BenchmarkDataModule`` arguments (data_path, holdout, limit_train, batch_size, ...).
        """
        super().__init__(train_split=train_split, val_split=val_split, **kwargs)

    def _matches(self, requested: str, value: str) -> bool:
        return value == requested or (requested == "validation" and value in VALIDATION_SPLITS)

    def read_split(self, split: str) -> Iterator[RawRow]:
        path = self.data_path
        if os.path.exists(path):
            if os.path.isfile(path):
                files = [path]
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".jsonl", ".jsonl.gz")))
                if not files:
                    raise FileNotFoundError(f"{path}: no .jsonl or .jsonl.gz files")
            rows = (raw for file in files for raw in read_json_file(file))
        elif split in VALIDATION_SPLITS:
            rows = read_hub(path, "validation", **self.hub_kwargs())
        else:
            yield from read_hub(path, split, **self.hub_kwargs())
            return
        seen: Counter = Counter()
        for source, number, row in rows:
            value = require_str(row, "split", f"{source}: row {number}") if isinstance(row, dict) else None
            seen[value] += 1
            if self._matches(split, value):
                yield source, number, row
        if not any(self._matches(split, value) for value in seen):
            raise ValueError(
                f"{path}: no rows with split '{split}' (found {dict(seen)}); local TL;DR batches hold only "
                "validation rows: use train_split='valid2', val_split='valid1' (or holdout=N)"
            )

    def hub_kwargs(self) -> dict[str, Any]:
        return {"name": "comparisons"}

    def parse_row(self, row: dict, where: str) -> dict:
        info = require_type(row, "info", where, dict, "an object {post, title, subreddit}")
        post, title, subreddit = (require_str(info, f, where, name=f"info.{f}") for f in ("post", "title", "subreddit"))
        summaries = require_type(row, "summaries", where, list, "a list of 2 summaries")
        if len(summaries) != 2:
            raise DataValidationError(f"{where}: field 'summaries': expected 2 summaries, got {len(summaries)}")
        texts = []
        for i, summary in enumerate(summaries):
            texts.append(require_str(summary, "text", where, name=f"summaries[{i}].text"))
        choice = require_type(row, "choice", where, int, "0 or 1")
        if choice not in (0, 1):
            raise DataValidationError(f"{where}: field 'choice': expected 0 or 1, got {choice}")
        if texts[0] == texts[1]:
            raise SkipRow("identical summaries (no preference signal)")
        return {
            PROMPT: tldr_prompt(subreddit, title, post),
            CHOSEN: texts[choice],
            REJECTED: texts[1 - choice],
        }
