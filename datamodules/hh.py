"""Anthropic HH-RLHF preference pairs (Bai et al. 2022), native mode ``pair``.

Each row is ``{chosen, rejected}``: two whole dialogues ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that share
everything but the final Assistant answer. The prompt is the pair's longest shared prefix, cut back to (and
including) its last ``"\\n\\nAssistant:"``; chosen / rejected are what follows, unstripped (they usually
start with a space). Taking the *shared* prefix rather than each string's last marker matters on real data:
some answers themselves contain ``"\\n\\nAssistant:"`` (e.g. helpful-base row 1167), which a per-string
``rfind`` would split into different prompts.

Errors (``DataValidationError``): a field missing / not a string / empty, a dialogue with no
``"\\n\\nAssistant:"``, a pair whose shared prefix contains no ``"\\n\\nAssistant:"`` (the dialogues diverge
before the last answer: mismatched prefix), or an empty answer. Skipped, counted and logged: ``chosen ==
rejected`` (no preference signal; 2 rows in helpful-base test).

Local layout (``/work/shared/data/hh_rlhf``): ``<data_path>/<subset>/<split>.jsonl.gz`` with subsets
``harmless-base``, ``helpful-base``, …; a directory holding ``<split>.jsonl(.gz)`` itself or a single file
also work. Only test splits are on this machine, so for local runs use ``train_split: test`` with ``holdout:
N``. On the Hub (``Anthropic/hh-rlhf``) a subset is a ``data_dir``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from datamodules.base import BenchmarkDataModule
from datamodules.keys import CHOSEN, PROMPT, REJECTED
from datamodules.readers import DataValidationError, RawRow, SkipRow, read_hub, read_json_file, require_str

ASSISTANT = "\n\nAssistant:"


def split_hh_pair(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """Return ``(prompt, chosen_answer, rejected_answer)`` of one HH pair, or raise naming the field."""
    for field, text in ((CHOSEN, chosen), (REJECTED, rejected)):
        if ASSISTANT not in text:
            raise DataValidationError(f"{where}: field '{field}': no '\\n\\nAssistant:' turn in the dialogue")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise DataValidationError(
            f"{where}: field '{REJECTED}': does not share a prompt with '{CHOSEN}' (mismatched prefix: the "
            f"dialogues differ before any '\\n\\nAssistant:', after {len(shared)} common characters)"
        )
    prompt = shared[: cut + len(ASSISTANT)]
    answers = chosen[len(prompt) :], rejected[len(prompt) :]
    for field, answer in zip((CHOSEN, REJECTED), answers, strict=True):
        if answer == "":
            raise DataValidationError(f"{where}: field '{field}': empty final Assistant answer")
    return prompt, answers[0], answers[1]


class HHDataModule(BenchmarkDataModule):
    """Anthropic HH-RLHF (``Anthropic/hh-rlhf`` or a local copy); ``subsets`` picks e.g. helpful-base."""

    default_data_path = "Anthropic/hh-rlhf"

    def __init__(self, subsets: list[str] | None = None, **kwargs: Any):
        """
        Args:
            subsets: subset directories to use (``harmless-base``, ``helpful-base``, ...); ``None`` = all
            found.
            **kwargs: ``BenchmarkDataModule`` arguments (data_path, train_split, val_split, holdout, ...).
        """
        super().__init__(**kwargs)
        self.subsets = list(subsets) if subsets is not None else None

    def read_split(self, split: str) -> Iterator[RawRow]:
        path = self.data_path
        if not os.path.exists(path):
            for subset in self.subsets or [None]:
                yield from read_hub(path, split, **({"data_dir": subset} if subset else {}))
            return
        if os.path.isfile(path) or any(
            os.path.isfile(os.path.join(path, f"{split}.jsonl{ext}")) for ext in ("", ".gz")
        ):
            for file in self.local_files(split):
                yield from read_json_file(file)
            return
        found = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        subsets = self.subsets if self.subsets is not None else found
        unknown = sorted(set(subsets) - set(found))
        if unknown:
            raise FileNotFoundError(f"{path}: no subset directory {unknown} (found: {found})")
        files = []
        for subset in subsets:
            for ext in (".jsonl.gz", ".jsonl"):
                file = os.path.join(path, subset, split + ext)
                if os.path.isfile(file):
                    files.append(file)
                    break
            else:
                if self.subsets is not None:
                    raise FileNotFoundError(f"{path}/{subset}: no {split}.jsonl.gz or {split}.jsonl")
        if not files:
            raise FileNotFoundError(f"{path}: no subset has a '{split}' split (subsets: {subsets})")
        for file in files:
            yield from read_json_file(file)

    def parse_row(self, row: dict, where: str) -> dict:
        chosen, rejected = require_str(row, CHOSEN, where), require_str(row, REJECTED, where)
        if chosen == rejected:
            raise SkipRow("chosen == rejected (no preference signal)")
        prompt, chosen_answer, rejected_answer = split_hh_pair(chosen, rejected, where)
        return {PROMPT: prompt, CHOSEN: chosen_answer, REJECTED: rejected_answer}
