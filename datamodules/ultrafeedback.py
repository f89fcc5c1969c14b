"""Binarized UltraFeedback (``HuggingFaceH4/ultrafeedback_binarized``), native mode ``pair``.

Row: ``{prompt: str, chosen: [{role, content}, ...], rejected: [...], score_chosen, score_rejected}``; the
last message of ``chosen`` / ``rejected`` is the assistant answer, the messages before it are the
conversation so far (they must be the same in both; when ``chosen`` holds only the answer, ``prompt`` becomes
the user message).

The prompt is rendered with ``tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)`` when the tokenizer has a chat template; otherwise as plain text
``"{system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}...\\n\\nAssistant:"`` — and then, as in HH-RLHF,
the completion gets a leading space (``" " + content``). With a chat template the completion is the content
as is. Pairs whose two answers are identical are skipped (counted, logged). The scores are not used.

Local data: a directory of ``<split>.jsonl(.gz)`` (e.g. ``train_prefs.jsonl.gz``) or a single file (= the
train split; use ``holdout`` for validation).
"""

from __future__ import annotations

from typing import Any

from datamodules.base import BenchmarkDataModule
from datamodules.keys import CHOSEN, PROMPT, REJECTED
from datamodules.readers import DataValidationError, SkipRow, require_str, require_type

_PLAIN_ROLES = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "system": ""}


def render_plain(messages: list[dict]) -> str:
    """HH-style rendering of a conversation that awaits the assistant's answer."""
    return "".join(_PLAIN_ROLES[m["role"]] + m["content"] for m in messages) + "\n\nAssistant:"


class UltraFeedbackDataModule(BenchmarkDataModule):
    """Binarized UltraFeedback preference pairs; prompts use the tokenizer's chat template if it has one."""

    default_data_path = "HuggingFaceH4/ultrafeedback_binarized"
    parse_needs_tokenizer = True  # the prompt uses the tokenizer's chat template when it has one

    def __init__(self, train_split: str = "train_prefs", val_split: str | None = "test_prefs", **kwargs: Any):
        """
        Args:
            train_split / val_split: Hub splits or local ``<split>.jsonl(.gz)`` stems (``None``: no
            validation).
            **kwargs: ``BenchmarkDataModule`` arguments (data_path, holdout, limit_train, batch_size, ...).
        """
        super().__init__(train_split=train_split, val_split=val_split, **kwargs)

    def _messages(self, row: dict, field: str, where: str) -> list[dict]:
        messages = require_type(row, field, where, list, "a list of {role, content} messages")
        if not messages:
            raise DataValidationError(f"{where}: field '{field}': expected a non-empty list of messages, got []")
        for i, message in enumerate(messages):
            role = require_str(message, "role", where, name=f"{field}[{i}].role")
            if role not in _PLAIN_ROLES:
                raise DataValidationError(
                    f"{where}: field '{field}[{i}].role': expected one of {sorted(_PLAIN_ROLES)}, got {role!r}"
                )
            require_str(message, "content", where, name=f"{field}[{i}].content")
        if messages[-1]["role"] != "assistant":
            raise DataValidationError(
                f"{where}: field '{field}': the last message must be the assistant's answer, "
                f"got role {messages[-1]['role']!r}"
            )
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def parse_row(self, row: dict, where: str) -> dict:
        prompt = require_str(row, PROMPT, where)
        chosen, rejected = self._messages(row, CHOSEN, where), self._messages(row, REJECTED, where)
        if chosen[:-1] != rejected[:-1]:
            raise DataValidationError(
                f"{where}: field '{REJECTED}': its conversation before the answer differs from '{CHOSEN}''s"
            )
        context = chosen[:-1] or [{"role": "user", "content": prompt}]
        answers = chosen[-1]["content"], rejected[-1]["content"]
        if answers[0] == answers[1]:
            raise SkipRow("identical chosen and rejected answers (no preference signal)")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
            return {PROMPT: text, CHOSEN: answers[0], REJECTED: answers[1]}
        return {PROMPT: render_plain(context), CHOSEN: " " + answers[0], REJECTED: " " + answers[1]}
