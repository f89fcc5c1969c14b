"""Controlled generation (Khalifa et al. 2021, GDC; Korbak et al. 2022): the same prompt many times, native mode
``prompt``. The tasks are defined by the target EBM of the module (``lit_align.ebm``), not by data: the single
word "amazing", a word-list topic, a sentiment classifier or lexicon, or a distributional constraint such as 50 %
of biographies about women. With the default empty prompt generation is unconditional: the prompt is the
tokenizer's BOS token (EOS when it has none), as the papers' GPT-2 runs start from ``<|endoftext|>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from datamodules.base import BenchmarkDataModule
from datamodules.keys import PROMPT
from datamodules.readers import RawRow

SOURCE = "<controlled generation>"


class ControlledGenerationDataModule(BenchmarkDataModule):
    """``num_train`` copies of ``prompt`` for training and ``num_val`` for validation; no files.

    Args:
        prompt: the prefix of every sample; "" = unconditional (BOS).
        num_train: training rows per epoch (samples per epoch = num_train; each batch is one DPG step).
        num_val: validation rows (samples per validation).
        **kwargs: ``BenchmarkDataModule`` arguments (batch_size, eval_batch_size, max_prompt_length, ...).
    """

    native_mode = "prompt"
    parse_needs_tokenizer = True  # an empty prompt becomes the tokenizer's BOS (or EOS) token

    def __init__(self, prompt: str = "", num_train: int = 1024, num_val: int = 64, **kwargs: Any) -> None:
        if num_train < 1 or num_val < 0:
            raise ValueError(f"num_train must be >= 1 and num_val >= 0, got {num_train}, {num_val}")
        kwargs.setdefault("max_prompt_length", 64)
        kwargs.setdefault("max_length", kwargs["max_prompt_length"] + 1)
        super().__init__(data_path=SOURCE, val_split="val" if num_val else None, **kwargs)
        self.prompt, self.num_train, self.num_val = prompt, num_train, num_val

    def read_split(self, split: str) -> Iterator[RawRow]:
        count = self.num_train if split == self.train_split else self.num_val
        for number in range(1, count + 1):
            yield SOURCE, number, {PROMPT: self.prompt}

    def parse_row(self, row: dict, where: str) -> dict:
        prompt = row[PROMPT]
        if not prompt:
            prompt = self.tokenizer.bos_token or self.tokenizer.eos_token
            if not prompt:
                raise ValueError(f"{where}: an empty prompt needs a tokenizer with a BOS or EOS token")
        return {PROMPT: prompt}
