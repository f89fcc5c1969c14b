"""IMDB movie reviews (Maas et al. 2011) as continuation prompts, native mode ``prompt``.

Used for positive-sentiment continuation with PPO (Elastic Reset's IMDB setup, after RL4LMs): the policy sees
the start of a review and is rewarded for a positive continuation; drift is measured as perplexity on held-out
human reviews (``heldout_texts``).

Prompt construction from a review (``review_prompt``): ``<br />`` line breaks become spaces and whitespace is
collapsed (``clean_review``); the prompt is the first ``prompt_fraction`` (default 50%) of the review's words,
the ``reference`` is the rest, with its leading space, so ``prompt + reference`` is exactly the cleaned review.
Tokenization then keeps at most the *last* ``max_prompt_length`` (default 64) prompt tokens — the base class's
prompt-tail truncation, counted in ``truncation_stats``; the ``prompt`` strings in a batch stay untruncated
(decode ``prompt_input_ids`` for what the model sees). Skipped, counted and logged: reviews with fewer than
``min_words`` words, and rows whose ``label`` differs from the ``label`` filter. Errors
(``DataValidationError`` naming file, row and field): ``text`` missing / not a string / empty, or — only when
filtering by label — ``label`` not an int.

Sources (``data_path``):

* ``None`` (default): ``datamodules/prompts/imdb_openers.txt``, a few hundred short movie-review openers
  written for lit-align and shipped with it. Each opener is a whole prompt (no reference, no ``min_words``).
  There is no human review text: validation is a ``holdout`` (default 32) of the openers themselves.
  Any other ``.txt`` file works the same way: one opener per line, ``#`` comment lines and blank lines skipped.
* a Hub id, e.g. ``"stanfordnlp/imdb"`` (``HUB_ID``; fields ``text``, ``label``; splits ``train`` / ``test``).
* a local directory with ``<split>.jsonl(.gz)`` or a single JSONL file (the train split), e.g. the shared copy
  ``../shared/data/imdb`` (``id, split, label, label_text, rating, text``), which has only ``train.jsonl.gz``.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterator
from typing import Any

from datamodules.base import BenchmarkDataModule
from datamodules.keys import PROMPT, REFERENCE
from datamodules.readers import RawRow, SkipRow, require_str, require_type

SHIPPED_OPENERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "imdb_openers.txt")
HUB_ID = "stanfordnlp/imdb"
OPENER = "opener"  # the field of a row read from an openers .txt file

_BR = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def clean_review(text: str) -> str:
    """Replace HTML line breaks (``<br />``, ``<br/>``, ``<br>``) with spaces and collapse all whitespace."""
    return " ".join(_BR.sub(" ", text).split())


def review_prompt(text: str, prompt_fraction: float = 0.5) -> tuple[str, str]:
    """Split a review into ``(prompt, reference)`` on a word boundary.

    The prompt is the first ``floor(n * prompt_fraction)`` of the cleaned review's ``n`` words (at least one,
    and at least one word is left for the reference); the reference is the rest with its leading space, so
    ``prompt + reference == clean_review(text)``.
    """
    words = clean_review(text).split()
    if len(words) < 2:
        raise ValueError(f"a review needs >= 2 words to split into prompt and reference, got {len(words)}")
    k = min(max(math.floor(len(words) * prompt_fraction + 1e-9), 1), len(words) - 1)
    return " ".join(words[:k]), " " + " ".join(words[k:])


def read_openers(path: str) -> Iterator[RawRow]:
    """Yield ``(path, line_number, {"opener": line})`` for every non-blank, non-``#`` line of a text file."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield path, number, {OPENER: line}


class IMDBDataModule(BenchmarkDataModule):
    """IMDB review-continuation prompts ``{prompt, reference}`` (or shipped openers ``{prompt}``).

    Offline with the shared copy (it has only a train file)::

        IMDBDataModule(data_path="../shared/data/imdb", val_split=None, holdout=200)

    On a networked machine: ``IMDBDataModule(data_path="stanfordnlp/imdb")`` (train / test). With no
    ``data_path`` the shipped openers are used, with 32 of them held out for validation.
    """

    native_mode = "prompt"
    default_data_path = SHIPPED_OPENERS

    def __init__(
        self,
        data_path: str | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        holdout: int | None = None,
        prompt_fraction: float = 0.5,
        min_words: int = 8,
        label: int | None = None,
        max_prompt_length: int = 64,
        **kwargs: Any,
    ):
        """
        Args:
            data_path: ``None`` = the shipped openers; else an openers ``.txt`` file, a Hub id
                (``"stanfordnlp/imdb"``), a local directory of ``<split>.jsonl(.gz)`` or a single JSONL file.
            train_split: split for training (Hub / local: ``train``).
            val_split: split for validation (Hub: ``test``); ``None`` for none. Not used with ``holdout`` > 0.
            holdout: rows carved out of the train split for validation; default 32 for an openers file, else 0.
                The shared local copy has only ``train.jsonl.gz``: pass ``val_split=None, holdout=N``.
            prompt_fraction: fraction of a review's words that forms the prompt (0 < f < 1).
            min_words: reviews with fewer (cleaned) words are skipped (counted and logged).
            label: keep only reviews with this label (1 = positive, 0 = negative); others are skipped and
                counted. ``None`` keeps all. Not available for openers, which have no label.
            max_prompt_length: prompt tokens kept (the tail) after tokenization (Elastic Reset / RL4LMs: 64).
            **kwargs: ``BenchmarkDataModule`` arguments (limit_train, batch_size, max_length, seed, ...).
        """
        path = data_path if data_path is not None else SHIPPED_OPENERS
        openers = path.endswith(".txt")
        if holdout is None:
            holdout = 32 if openers else 0
        super().__init__(
            data_path=path,
            train_split=train_split,
            val_split=val_split,
            holdout=holdout,
            max_prompt_length=max_prompt_length,
            **kwargs,
        )
        if not 0.0 < prompt_fraction < 1.0:
            raise ValueError(f"prompt_fraction must be in (0, 1), got {prompt_fraction}")
        if min_words < 2:
            raise ValueError(f"min_words must be >= 2 (a prompt word and a reference word), got {min_words}")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise ValueError(f"label must be an int (0 = negative, 1 = positive) or None, got {label!r}")
        if openers and label is not None:
            raise ValueError(f"label={label} filters reviews by sentiment, but {path} holds unlabelled openers")
        self.openers = openers
        self.prompt_fraction, self.min_words, self.label = prompt_fraction, min_words, label
        self._heldout: list[str] | None = None

    # ---- reading and parsing ----

    def read_split(self, split: str) -> Iterator[RawRow]:
        if not self.openers:
            yield from super().read_split(split)
            return
        if split != self.train_split:
            raise ValueError(
                f"{self.data_path} is a file of openers with no split '{split}': validation is a holdout of the "
                "openers (holdout=N, default 32); with holdout=0 pass val_split=None"
            )
        yield from read_openers(self.data_path)

    def parse_row(self, row: dict, where: str) -> dict:
        if self.openers:
            return {PROMPT: row[OPENER]}
        text = clean_review(require_str(row, "text", where))
        if self.label is not None:
            label = require_type(row, "label", where, int, "an int label (0 = negative, 1 = positive)")
            if label != self.label:
                raise SkipRow(f"label != {self.label} (label filter)")
        if len(text.split()) < self.min_words:
            raise SkipRow(f"fewer than min_words={self.min_words} words")
        prompt, reference = review_prompt(text, self.prompt_fraction)
        return {PROMPT: prompt, REFERENCE: reference}

    # ---- held-out human text for drift metrics ----

    def heldout_texts(self, n: int | None = None) -> list[str]:
        """Full cleaned reviews of the validation side (``val_split`` or the ``holdout``), for perplexity drift.

        Each text is ``prompt + reference`` of a validation record (exactly ``clean_review`` of the raw review),
        after ``min_words`` / ``label`` / ``limit_val``. Deterministic: a seeded (``seed``) shuffle of the
        validation records, first ``n`` (all when ``None``); the order does not depend on ``n``, so
        ``heldout_texts(k)`` is a prefix of ``heldout_texts()``. Never contains training records.

        With openers (the shipped default) there is no human review text: this returns the held-out
        validation openers themselves.
        Needs no tokenizer and does not need ``setup()``.
        """
        if self._heldout is None:
            _, val = self._native_records()
            if val is None:
                raise ValueError(
                    f"{type(self).__name__}: no validation side to draw held-out texts from (val_split=None and "
                    "holdout=0); set holdout=N or val_split"
                )
            texts = [r[PROMPT] + r.get(REFERENCE, "") for r in val]
            random.Random(self.seed).shuffle(texts)
            self._heldout = texts
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0 or None, got {n}")
        return list(self._heldout if n is None else self._heldout[:n])
