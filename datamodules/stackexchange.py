"""StackExchange preference pairs (``lvwerra/stack-exchange-paired``), native mode ``pair``.

The dataset of StackLLaMA (Beeching et al. 2023, "StackLLaMA: A hands-on guide to train LLaMA with RLHF",
https://huggingface.co/blog/stackllama). Row: ``{question, response_j, response_k, qid?, date?, metadata?}``
where ``response_j`` is the preferred answer. Prompt ``"Question: {question}\\n\\nAnswer:"`` (the StackLLaMA
format); chosen = ``" " + response_j``, rejected = ``" " + response_k``. Pairs with identical answers are
skipped (counted, logged). Errors (``DataValidationError``, naming file, row, field): a field missing, not a
string or empty.

Local data: a directory of ``<split>.jsonl(.gz)`` or a single file (the base class's default); on the Hub the
splits are ``train`` / ``test`` of the default config.
"""

from __future__ import annotations

from datamodules.base import BenchmarkDataModule
from datamodules.keys import CHOSEN, PROMPT, REJECTED
from datamodules.readers import SkipRow, require_str


def stackexchange_prompt(question: str) -> str:
    return f"Question: {question}\n\nAnswer:"


class StackExchangeDataModule(BenchmarkDataModule):
    """StackExchange paired answers (StackLLaMA, Beeching et al. 2023; ``lvwerra/stack-exchange-paired``)."""

    native_mode = "pair"
    default_data_path = "lvwerra/stack-exchange-paired"

    def parse_row(self, row: dict, where: str) -> dict:
        question = require_str(row, "question", where)
        chosen, rejected = require_str(row, "response_j", where), require_str(row, "response_k", where)
        if chosen == rejected:
            raise SkipRow("response_j == response_k (no preference signal)")
        return {PROMPT: stackexchange_prompt(question), CHOSEN: " " + chosen, REJECTED: " " + rejected}
