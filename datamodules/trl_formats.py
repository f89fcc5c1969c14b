"""``TRLFormatDataModule``: your own data in any of TRL's dataset formats, standard (strings) or conversational
(lists of ``{role, content}`` messages). The format is recognised from the columns:

=============================== ============================== ===========
format                          columns                        native mode
=============================== ============================== ===========
language modelling              ``text`` / ``messages``        text
prompt-only                     ``prompt``                     prompt
prompt-completion               ``prompt, completion``         text
preference (explicit prompt)    ``prompt, chosen, rejected``   pair
preference (implicit prompt)    ``chosen, rejected``           pair
unpaired preference             ``prompt, completion, label``  unpaired
=============================== ============================== ===========

Every data mode the base class derives is then served (pairs → unpaired / text / prompt; unpaired → prompt), so
the same file feeds DPO, KTO, SFT and PPO/GRPO. ``columns`` renames the file's columns (``{prompt: question}``).
Conversational rows go through the tokenizer's chat template (or ``chat_template``): the prompt with the generation
prompt, the completion exactly the assistant turn that follows (its end-of-turn token is the EOS the collator adds).
An implicit prompt is the longest common prefix of ``chosen`` and ``rejected`` (whole messages when
conversational), as TRL extracts it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import datamodules.keys as batch_keys
from datamodules.base import BenchmarkDataModule
from datamodules.keys import (
    CHOSEN,
    COMPLETION,
    EXTRA_COLUMNS,
    LABEL,
    PROMPT,
    PROMPT_MESSAGES,
    REJECTED,
    REWARD_FUNCTION_ARGUMENTS,
    TEXT,
)
from datamodules.readers import DataValidationError, RawRow, read_hub, read_json_file

MESSAGES = "messages"
FORMATS: dict[frozenset[str], tuple[str, str]] = {
    frozenset({TEXT}): ("language modelling", "text"),
    frozenset({MESSAGES}): ("language modelling", "text"),
    frozenset({PROMPT}): ("prompt-only", "prompt"),
    frozenset({PROMPT, COMPLETION}): ("prompt-completion", "text"),
    frozenset({PROMPT, CHOSEN, REJECTED}): ("preference (explicit prompt)", "pair"),
    frozenset({CHOSEN, REJECTED}): ("preference (implicit prompt)", "pair"),
    frozenset({PROMPT, COMPLETION, LABEL}): ("unpaired preference", "unpaired"),
}
KNOWN_COLUMNS = frozenset().union(*FORMATS)
# names a prompt batch (or TRL's reward-function call) already uses: another column by one of them is refused
RESERVED_NAMES = frozenset(
    {getattr(batch_keys, name) for name in batch_keys.__all__ if isinstance(getattr(batch_keys, name), str)}
    | set(REWARD_FUNCTION_ARGUMENTS)
)
ACCEPTED = "; ".join(f"{name}: {', '.join(sorted(columns))}" for columns, (name, _) in FORMATS.items())


class TRLFormatDataModule(BenchmarkDataModule):
    """Any dataset in TRL's formats: a Hub id, a local ``.json``/``.jsonl``/``.jsonl.gz``/``.parquet``/``.csv`` file
    or a directory of ``<split>.<ext>`` files, or an in-memory ``datasets.Dataset`` / ``DatasetDict``."""

    parse_needs_tokenizer = True  # conversational rows use the chat template

    def __init__(
        self,
        data_path: Any,
        columns: dict[str, str] | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            data_path: Hub dataset id, local file or directory, or a ``datasets.Dataset`` / ``DatasetDict``.
            columns: canonical name → the dataset's column (``{prompt: question, chosen: response_j}``).
            system_prompt: a system message put before conversational prompts that have none.
            chat_template: a Jinja chat template used instead of the tokenizer's.
            hub_config: the Hub dataset's configuration name.
            train_split / val_split: split names (a single file or ``Dataset`` is the train split).
            **kwargs: ``BenchmarkDataModule`` arguments (holdout, limit_train, batch_size, max_length, ...).
        """
        unknown = set(columns or {}) - KNOWN_COLUMNS
        if unknown:
            raise ValueError(f"columns: unknown canonical names {sorted(unknown)}; known: {sorted(KNOWN_COLUMNS)}")
        super().__init__(data_path=data_path, train_split=train_split, val_split=val_split, **kwargs)
        self.columns, self.system_prompt, self.chat_template = dict(columns or {}), system_prompt, chat_template
        self.hub_config = hub_config
        self.format: str | None = None  # recognised from the first row
        self._columns: frozenset[str] = frozenset()
        self.native_mode = "pair"  # replaced by the recognised format's mode when the rows are parsed

    # ---- reading ----

    def read_split(self, split: str) -> Iterator[RawRow]:
        source = self.data_path
        if hasattr(source, "column_names"):  # datasets.Dataset or DatasetDict
            if isinstance(source.column_names, dict):
                if split not in source:
                    raise ValueError(f"the DatasetDict has no split {split!r} (splits: {sorted(source)})")
                source = source[split]
            elif split != self.train_split:
                raise ValueError(f"an in-memory Dataset is the train split; it has no split {split!r} (use holdout)")
            for number, row in enumerate(source, start=1):
                yield f"<in-memory dataset>[{split}]", number, row
            return
        if not os.path.exists(source):
            yield from read_hub(source, split, **({"name": self.hub_config} if self.hub_config else {}))
            return
        path = source if os.path.isfile(source) else self.split_file(split)
        if path.endswith((".parquet", ".csv")):
            import datasets

            try:
                table = datasets.load_dataset(path.rsplit(".", 1)[1], data_files=path, split="train")
            except ValueError as err:  # datasets: 'Instruction "train" corresponds to no data!'
                if "corresponds to no data" not in str(err):
                    raise
                raise DataValidationError(f"{path}: split {split!r} is empty (0 rows)") from err
            for number, row in enumerate(table, start=1):
                yield path, number, row
        else:
            yield from read_json_file(path)

    def split_file(self, split: str) -> str:
        """``<data_path>/<split>.<ext>`` for a directory; a single file is the train split."""
        for ext in ("jsonl.gz", "jsonl", "json", "parquet", "csv"):
            candidate = os.path.join(self.data_path, f"{split}.{ext}")
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(
            f"{self.data_path}: no {split}.jsonl(.gz)/.json/.parquet/.csv for split {split!r} "
            f"(found: {sorted(os.listdir(self.data_path))})"
        )

    def local_files(self, split: str) -> list[str]:
        return [self.split_file(split)] if os.path.isdir(self.data_path) else super().local_files(split)

    # ---- rows → records ----

    def parse_row(self, row: dict, where: str) -> dict:
        row = {canonical: row[column] for canonical, column in self.columns.items() if column in row} | {
            key: value for key, value in row.items() if key not in self.columns.values()
        }
        # readers that fill a file's columns across rows (datasets) give absent fields as None
        present = frozenset(key for key in row if key in KNOWN_COLUMNS and row[key] is not None)
        nulls = sorted(key for key in row if key in KNOWN_COLUMNS and row[key] is None)
        if self.format is not None and nulls and present | set(nulls) == self._columns:
            raise DataValidationError(f"{where}: field '{nulls[0]}': missing (null)")
        if present not in FORMATS:
            raise DataValidationError(
                f"{where}: columns {sorted(key for key in row if row[key] is not None)} match none of TRL's formats "
                f"(map yours with columns=). Accepted: {ACCEPTED}"
            )
        name, mode = FORMATS[present]
        if self.format is None:
            self.format, self.native_mode, self._columns = name, mode, present
        elif self._columns != present:
            raise DataValidationError(f"{where}: a {name} row in a {self.format} dataset (columns {sorted(present)})")
        if LABEL in present and not isinstance(row[LABEL], bool):
            raise DataValidationError(
                f"{where}: field 'label': expected a bool (true/false), got {type(row[LABEL]).__name__}"
            )
        if present == {MESSAGES}:
            messages = self.messages(row[MESSAGES], MESSAGES, where)
            if messages[-1]["role"] != "assistant":
                raise DataValidationError(f"{where}: field 'messages': the last message must be the assistant's")
            return self.prompt_and_completion(messages[:-1], messages[-1:], where)
        if present == {TEXT}:
            return {TEXT: self.standard(row[TEXT], where)}
        if present == {CHOSEN, REJECTED}:
            row = {**row, **self.implicit_prompt(row[CHOSEN], row[REJECTED], where)}
        prompt = row[PROMPT]
        if mode == "prompt":
            return self.prompt_record(prompt, row, where)
        if mode == "pair":
            chosen = self.prompt_and_completion(prompt, row[CHOSEN], where, CHOSEN)
            rejected = self.prompt_and_completion(prompt, row[REJECTED], where, REJECTED)
            return {PROMPT: chosen[PROMPT], CHOSEN: chosen[COMPLETION], REJECTED: rejected[COMPLETION]}
        record = self.prompt_and_completion(prompt, row[COMPLETION], where)
        return {**record, LABEL: row[LABEL]} if mode == "unpaired" else record

    def prompt_record(self, prompt: Any, row: dict, where: str) -> dict:
        """A prompt-only row as GRPO's reward functions see it in TRL: the rendered prompt, the conversational
        prompt's messages (``PROMPT_MESSAGES``), and every other column of the row (``EXTRA_COLUMNS``, passed to
        reward functions by name, e.g. a ``solution`` to check answers against)."""
        record: dict[str, Any] = {PROMPT: self.render_prompt(prompt, where)}
        if not isinstance(prompt, str):
            record[PROMPT_MESSAGES] = self.with_system(self.messages(prompt, PROMPT, where))
        extras = {key: value for key, value in row.items() if key not in KNOWN_COLUMNS}
        if clashes := sorted(set(extras) & RESERVED_NAMES):
            raise DataValidationError(
                f"{where}: column '{clashes[0]}' has a name the batch uses for its own; rename it in your data"
            )
        if extras:
            record[EXTRA_COLUMNS] = extras
        return record

    @staticmethod
    def messages(value: Any, field: str, where: str) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise DataValidationError(f"{where}: field '{field}': expected a non-empty list of {{role, content}}")
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise DataValidationError(f"{where}: field '{field}[{i}]': expected {{role, content}}, got {message!r}")
        return [{"role": m["role"], "content": m["content"]} for m in value]

    @staticmethod
    def implicit_prompt(chosen: Any, rejected: Any, where: str) -> dict:
        """The shared start of ``chosen`` and ``rejected`` as the prompt (whole messages when conversational; for
        strings a space before the point where they differ stays with the completions)."""
        if isinstance(chosen, list) and isinstance(rejected, list):
            chosen = TRLFormatDataModule.messages(chosen, CHOSEN, where)  # errors name chosen[i], not the split
            rejected = TRLFormatDataModule.messages(rejected, REJECTED, where)
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            if shared == 0:
                raise DataValidationError(f"{where}: 'chosen' and 'rejected' share no prompt messages")
            return {PROMPT: chosen[:shared], CHOSEN: chosen[shared:], REJECTED: rejected[shared:]}
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataValidationError(
                f"{where}: fields 'chosen' and 'rejected' must both be strings or both lists of messages, got "
                f"{type(chosen).__name__} and {type(rejected).__name__}"
            )
        shared = len(os.path.commonprefix([chosen, rejected]))
        if shared and chosen[shared - 1] == " ":
            shared -= 1
        if shared == 0:
            raise DataValidationError(f"{where}: 'chosen' and 'rejected' share no prompt (implicit-prompt format)")
        return {PROMPT: chosen[:shared], CHOSEN: chosen[shared:], REJECTED: rejected[shared:]}

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def apply_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                f"{type(self).__name__}: conversational rows need a chat template and the tokenizer has none; "
                "set chat_template= (a Jinja template) or give standard (string) rows"
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )

    def standard(self, text: str, where: str) -> str:
        """A string (standard-format) field, refused when ``system_prompt`` is set: it has nowhere to go."""
        if self.system_prompt:
            raise DataValidationError(
                f"{where}: system_prompt is set but the rows are standard (strings); a system prompt needs "
                "conversational rows ({role, content} messages)"
            )
        return text

    def render_prompt(self, prompt: Any, where: str) -> str:
        if isinstance(prompt, str):
            return self.standard(prompt, where)
        return self.apply_template(self.with_system(self.messages(prompt, PROMPT, where)), add_generation_prompt=True)

    def prompt_and_completion(self, prompt: Any, completion: Any, where: str, field: str = COMPLETION) -> dict:
        """``{prompt, completion}`` strings; conversational: the templated prompt with the generation prompt, and
        exactly the text the template adds for the completion's messages, without its final end-of-turn token
        (the collator appends the tokenizer's EOS). ``field``: the completion's column (``chosen``...), for errors."""
        if isinstance(prompt, str) and isinstance(completion, str):
            return {PROMPT: self.standard(prompt, where), COMPLETION: completion}
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DataValidationError(
                f"{where}: fields 'prompt' and '{field}' must both be strings or both lists of messages, got "
                f"{type(prompt).__name__} and {type(completion).__name__}"
            )
        context = self.with_system(self.messages(prompt, PROMPT, where))
        answer = self.messages(completion, field, where)
        prompt_text = self.apply_template(context, add_generation_prompt=True)
        full = self.apply_template(context + answer, add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise DataValidationError(f"{where}: the chat template renders the prompt differently inside the dialogue")
        completion_text = full[len(prompt_text) :].rstrip("\n")
        eos = self.tokenizer.eos_token
        if eos and completion_text.endswith(eos):
            completion_text = completion_text[: -len(eos)]
        return {PROMPT: prompt_text, COMPLETION: completion_text}
