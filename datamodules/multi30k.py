"""Multi30k pivot translation (Elliott et al. 2016; the EN→FR→DE game of Lee et al. 2019, used by Elastic
Reset, Noukhovitch et al. 2023).

The policy translates English to French; a frozen model translates that French to German; the reward is the
BLEU of the German against the German reference (``lit_align.rewards.PivotBLEUReward``). Language drift shows
as French that the pivot still decodes but that no longer matches the French reference.

Records (native mode ``prompt``): ``{prompt, reference, reference_de, source}`` — the instruction prompt with
the English sentence, the French reference, the German reference and the English source. The prompt uses the
tokenizer's chat template when it has one (instruction-tuned causal LMs), else a plain instruction.

Local data: a directory with line-aligned ``<split>.{en,fr,de}(.gz)`` files, as in ``../shared/data/multi30k``
(splits ``train`` and ``val``): ``data_path=../shared/data/multi30k, train_split=train, val_split=val``.
Files of one split with different line counts are an error naming the files.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from typing import Any

from datamodules.base import BenchmarkDataModule
from datamodules.keys import PROMPT, REFERENCE
from datamodules.readers import DataValidationError, RawRow, SkipRow

REFERENCE_DE = REFERENCE + "_de"
SOURCE = "source"
LANGUAGES = ("en", "fr", "de")
INSTRUCTION = "Translate this English sentence into French. Answer with the translation only.\n{sentence}"


def translation_prompt(tokenizer: Any, instruction: str) -> str:
    """A user turn rendered with the tokenizer's chat template, or a plain ``instruction\\nAnswer:`` prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return instruction + "\nTranslation:"


def _read_lines(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


class PivotTranslationDataModule(BenchmarkDataModule):
    """Multi30k EN→FR prompts with French and German references for pivot-translation RL.

    Args:
        data_path: a directory of line-aligned ``<split>.{en,fr,de}(.gz)`` files.
        **kwargs: see :class:`~datamodules.base.BenchmarkDataModule` (``val_split`` defaults to ``val``).
    """

    native_mode = "prompt"
    parse_needs_tokenizer = True  # the prompt uses the tokenizer's chat template

    def __init__(
        self, data_path: str | None = None, train_split: str = "train", val_split: str | None = "val", **kwargs
    ):
        kwargs.setdefault("max_prompt_length", 128)
        kwargs.setdefault("max_length", 192)
        super().__init__(data_path=data_path, train_split=train_split, val_split=val_split, **kwargs)

    def read_split(self, split: str) -> Iterator[RawRow]:
        if not os.path.isdir(self.data_path):
            raise FileNotFoundError(
                f"{self.data_path}: PivotTranslationDataModule reads a local directory of <split>.{{en,fr,de}}(.gz) "
                "files (e.g. ../shared/data/multi30k)"
            )
        files = {}
        for language in LANGUAGES:
            candidates = [os.path.join(self.data_path, f"{split}.{language}{ext}") for ext in (".gz", "")]
            found = [c for c in candidates if os.path.isfile(c)]
            if not found:
                raise FileNotFoundError(f"{self.data_path}: no {split}.{language}(.gz) for split '{split}'")
            files[language] = found[0]
        lines = {language: _read_lines(path) for language, path in files.items()}
        counts = {files[language]: len(rows) for language, rows in lines.items()}
        if len(set(counts.values())) != 1:
            raise DataValidationError(f"split '{split}': line counts differ, the files are not aligned: {counts}")
        for number, sentences in enumerate(zip(*(lines[language] for language in LANGUAGES), strict=True), start=1):
            yield files["en"], number, dict(zip(LANGUAGES, sentences, strict=True))

    def parse_row(self, row: dict, where: str) -> dict:
        if not all(row[language].strip() for language in LANGUAGES):
            empty = [language for language in LANGUAGES if not row[language].strip()]
            raise SkipRow(f"empty sentence in {', '.join(empty)}")
        prompt = translation_prompt(self.tokenizer, INSTRUCTION.format(sentence=row["en"].strip()))
        return {
            PROMPT: prompt,
            REFERENCE: row["fr"].strip(),
            REFERENCE_DE: row["de"].strip(),
            SOURCE: row["en"].strip(),
        }
