"""The base class of every benchmark DataModule: validation, data modes, tokenization, truncation, collation.

A benchmark subclass only reads raw rows (``read_split``) and maps each row to a canonical record of its
native mode (``parse_row``). Everything else happens here, for whichever mode the attached module asks:

========== ======================================= ==============================================
mode       canonical record                        derived from a ``pair`` record
========== ======================================= ==============================================
prompt     ``{prompt, reference?}``                ``{prompt, reference=chosen}``
pair       ``{prompt, chosen, rejected}``          —
unpaired   ``{prompt, completion, label: bool}``   ``(prompt, chosen, True)``,
                                                   ``(prompt, rejected, False)``, shuffled (seed)
text       ``{text}`` or ``{prompt, completion}``  ``{prompt, completion=chosen}``
========== ======================================= ==============================================

Tokenization is ``tokenizer(text, add_special_tokens=False)``; completions (and ``{text}`` records) get
``tokenizer.eos_token_id`` appended, prompts do not. Prompt and completion are tokenized separately and
concatenated, so a completion mask marks exactly the completion's own tokens. Truncation keeps the prompt's
*tail* (at most ``max_prompt_length`` tokens) and then the completion's *head* (prompt + completion ≤
``max_length``; the EOS is dropped when it does not fit). Truncated rows are counted per split in
``truncation_stats``; skipped rows in ``skip_stats``; rows dropped to avoid size-1 unpaired batches in
``dropped_rows``. Every count is also logged.

The string lists in a batch hold the untruncated text of each record.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# ---- canonical batch keys (import these, never spell the strings) --------------------------------
PROMPT_INPUT_IDS = "prompt_input_ids"
PROMPT_ATTENTION_MASK = "prompt_attention_mask"
CHOSEN_INPUT_IDS = "chosen_input_ids"
CHOSEN_ATTENTION_MASK = "chosen_attention_mask"
CHOSEN_COMPLETION_MASK = "chosen_completion_mask"
REJECTED_INPUT_IDS = "rejected_input_ids"
REJECTED_ATTENTION_MASK = "rejected_attention_mask"
REJECTED_COMPLETION_MASK = "rejected_completion_mask"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
COMPLETION_MASK = "completion_mask"
LABEL = "label"
KL_INPUT_IDS = "kl_input_ids"
KL_ATTENTION_MASK = "kl_attention_mask"
KL_COMPLETION_MASK = "kl_completion_mask"
INDEX = "index"  # LongTensor [B]: position of the record in its split's dataset (stable across epochs)
# string lists carried in batches
PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
COMPLETION = "completion"
REFERENCE = "reference"
TEXT = "text"

DATA_MODES = ("prompt", "pair", "unpaired", "text")
SPLITS = ("train", "val")  # the roles a datamodule serves; "validation" and "test" are accepted as "val"

_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "val"}


class DataValidationError(ValueError):
    """A raw row (or file) is malformed; the message names the file, the 1-based row number and the field."""


class SkipRow(Exception):
    """Raised by ``parse_row`` for a valid row that is unusable by design; counted and logged by reason."""


# ---- validation helpers for subclasses -----------------------------------------------------------


def _type_name(value: Any) -> str:
    return "missing or null" if value is None else type(value).__name__


def require_str(row: dict, field: str, where: str, name: str | None = None) -> str:
    """Return ``row[field]`` if it is a non-empty string, else raise a ``DataValidationError`` naming the
    field (as ``name`` if given, e.g. ``"info.post"`` for a nested field)."""
    value = row.get(field) if isinstance(row, dict) else None
    if not isinstance(value, str) or value == "":
        got = "an empty string" if value == "" else _type_name(value)
        raise DataValidationError(f"{where}: field '{name or field}': expected a non-empty string, got {got}")
    return value


def require_type(
    row: dict, field: str, where: str, kind: type | tuple[type, ...], what: str, name: str | None = None
) -> Any:
    """Return ``row[field]`` if it is an instance of ``kind`` (bools never count as ints), else raise."""
    value = row.get(field) if isinstance(row, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise DataValidationError(f"{where}: field '{name or field}': expected {what}, got {_type_name(value)}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


# ---- reading raw rows ----------------------------------------------------------------------------


RawRow = tuple[str, int, dict]  # (source: file path or hub id[split], 1-based row number, row)


def read_json_file(path: str) -> Iterator[RawRow]:
    """Yield ``(path, row_number, row)`` from a local ``.jsonl`` / ``.jsonl.gz`` via ``datasets``.

    If ``datasets`` cannot read the file (bad JSON), or a field's type differs between rows, the file is
    re-read line by line with ``json``: a bad line is reported by row number, and the rows are validated with
    their types exactly as written, so a wrong type gets a row-and-field message.
    """
    import datasets

    try:
        data = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as err:  # noqa: BLE001 — any reader failure becomes a message naming the file
        numbered = _read_json_lines(path, err)
    else:
        # Types that differ between rows make `datasets` fall back to a lossy `Json` feature (it turns the
        # string "1" into the int 1); re-read such files exactly, so validation sees the types as written.
        mixed = "Json(" in repr(data.features)
        numbered = _read_json_lines(path, None) if mixed else list(enumerate(data.to_list(), start=1))
    for number, row in numbered:
        yield path, number, row


def _read_json_lines(path: str, cause: Exception | None) -> list[tuple[int, dict]]:
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataValidationError(f"{path}: row {number}: invalid JSON: {err}") from err
                if not isinstance(row, dict):
                    raise DataValidationError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
                rows.append((number, row))
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise DataValidationError(f"{path}: cannot read as JSON lines: {err}") from err
    if not rows:
        raise DataValidationError(f"{path}: cannot read as JSON lines: {cause or 'no rows'}") from cause
    return rows


def read_hub(hub_id: str, split: str, **kwargs: Any) -> Iterator[RawRow]:
    """Yield ``(f"{hub_id}[{split}]", row_number, row)`` from a Hugging Face Hub dataset."""
    import datasets

    try:
        data = datasets.load_dataset(hub_id, split=split, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise DataValidationError(
            f"{hub_id}: cannot load split '{split}' ({kwargs or 'default config'}) from the Hub: {err}. "
            "Offline? Pass data_path= a local directory or file instead."
        ) from err
    source = f"{hub_id}[{split}]" + (f"{{{', '.join(f'{k}={v}' for k, v in kwargs.items())}}}" if kwargs else "")
    for number, row in enumerate(data, start=1):
        yield source, number, row


# ---- tokenized datasets and collation ------------------------------------------------------------


class TokenizedDataset(Dataset):
    """Tokenized examples of one split in one mode; item ``i`` carries ``index = i``.

    ``records`` holds the canonical records (before tokenization) in the same order.
    """

    def __init__(self, items: list[dict], records: list[dict], mode: str):
        self.items, self.records, self.mode = items, records, mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], INDEX: i}


def _right_pad(
    prefixes: Sequence[list[int]], suffixes: Sequence[list[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``prefix + suffix`` rows; returns ids, attention mask, and a mask of the suffix tokens."""
    lengths = [len(p) + len(s) for p, s in zip(prefixes, suffixes, strict=True)]
    width = max(lengths) if length is None else length
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(lengths), width), dtype=torch.long)
    completion = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prefixes, suffixes, strict=True)):
        ids[i, : lengths[i]] = torch.tensor(p + s, dtype=torch.long)
        attention[i, : lengths[i]] = 1
        completion[i, len(p) : lengths[i]] = 1
    return ids, attention, completion


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            attention[i, width - len(s) :] = 1
    return ids, attention


class Collator:
    """Pads a list of tokenized items into a batch for one data mode (a picklable callable for workers)."""

    def __init__(self, mode: str, pad_id: int, max_length: int):
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
        else:  # pragma: no cover — modes are validated in setup
            raise ValueError(f"unknown data mode {self.mode!r}; expected one of {DATA_MODES}")
        return batch


# ---- the base DataModule -------------------------------------------------------------------------


class BenchmarkDataModule(LightningDataModule):
    """Base class of every benchmark: loads, validates, derives the requested mode, tokenizes and collates.

    Subclasses set ``native_mode`` / ``default_data_path`` and implement ``parse_row`` (and, if their files
    are not ``<data_path>/<split>.jsonl(.gz)`` or a plain Hub split, ``read_split``).
    """

    native_mode: ClassVar[str] = "pair"
    default_data_path: ClassVar[str | None] = None

    def __init__(
        self,
        data_path: str | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        holdout: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        mode: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        """
        Args:
            data_path: Hub dataset id, local directory or single file (default: the benchmark's Hub id).
            train_split: split (file stem / Hub split) used for training.
            val_split: split used for validation; ``None`` for none (unless ``holdout`` > 0).
            holdout: if > 0, carve this many rows (seeded shuffle) out of the train split as the
                validation set; it then replaces ``val_split``. Train and holdout are disjoint.
            limit_train: keep the first N train rows after a seeded shuffle (and after the holdout).
            limit_val: keep the first N validation rows after a seeded shuffle.
            batch_size: training batch size.
            eval_batch_size: validation batch size (default ``batch_size``).
            max_length: maximum prompt + completion tokens (completion head kept).
            max_prompt_length: maximum prompt tokens (tail kept); must be < ``max_length``.
            mode: data mode (one of ``DATA_MODES``); overrides the attached module's ``data_mode``.
            num_workers: DataLoader workers.
            seed: seed of every shuffle here (holdout, limits, unpaired order, train loader).
            shuffle: shuffle the train loader.
        """
        super().__init__()
        if max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}): "
                "a completion needs at least one token"
            )
        if mode is not None and mode not in DATA_MODES:
            raise ValueError(f"mode={mode!r} is not a data mode; expected one of {DATA_MODES}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {holdout}")
        self.data_path = data_path if data_path is not None else self.default_data_path
        if self.data_path is None:
            raise ValueError(f"{type(self).__name__} needs data_path (a Hub id, local directory or file)")
        self.train_split, self.val_split, self.holdout = train_split, val_split, holdout
        self.limit_train, self.limit_val = limit_train, limit_val
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.mode, self.num_workers, self.seed, self.shuffle = mode, num_workers, seed, shuffle
        self.tokenizer: Any = None
        self._configured_mode: str | None = None
        self._datasets: dict[str, TokenizedDataset] = {}
        self._setup_key: tuple | None = None
        self._raw_cache: dict[str, list[RawRow]] = {}
        self.truncation_stats: dict[str, dict[str, int]] = {}
        self.skip_stats: dict[str, Counter] = {}
        self.dropped_rows: dict[str, int] = {}

    # ---- what subclasses provide ----

    def parse_row(self, row: dict, where: str) -> dict:
        """Map one raw row to a ``native_mode`` record; raise ``DataValidationError`` or ``SkipRow``."""
        raise NotImplementedError

    def read_split(self, split: str) -> Iterator[RawRow]:
        """Yield the raw rows of ``split``: from ``<dir>/<split>.jsonl(.gz)``, a single file, or the Hub."""
        if os.path.exists(self.data_path):
            for path in self.local_files(split):
                yield from read_json_file(path)
        else:
            yield from read_hub(self.data_path, split, **self.hub_kwargs())

    def hub_kwargs(self) -> dict[str, Any]:
        """Extra ``datasets.load_dataset`` arguments for the Hub (e.g. a config name)."""
        return {}

    def local_files(self, split: str) -> list[str]:
        """Files of ``split``: a single file is the train split; a directory has ``<split>.jsonl(.gz)``."""
        path = self.data_path
        if os.path.isfile(path):
            if split != self.train_split:
                raise ValueError(
                    f"data_path {path} is a single file, used as the train split; it has no split '{split}'. "
                    "Set holdout=N to carve a validation set out of it, or val_split=null."
                )
            return [path]
        for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return [candidate]
        raise FileNotFoundError(
            f"{path}: no {split}.jsonl.gz or {split}.jsonl for split '{split}' (found: {sorted(os.listdir(path))})"
        )

    # ---- configuration ----

    def configure(self, tokenizer: Any = None, mode: str | None = None) -> BenchmarkDataModule:
        """Set the tokenizer and/or mode without a Trainer (they then win over the attached module's)."""
        if mode is not None and mode not in DATA_MODES:
            raise ValueError(f"mode={mode!r} is not a data mode; expected one of {DATA_MODES}")
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if mode is not None:
            self._configured_mode = mode
        return self

    def _resolve(self) -> tuple[Any, str]:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} has no tokenizer: attach it to a Trainer whose LightningModule has "
                "`.tokenizer`, or call dm.configure(tokenizer=...) first"
            )
        mode = self._configured_mode or self.mode or getattr(module, "data_mode", None)
        if mode not in DATA_MODES:
            raise ValueError(
                f"data mode {mode!r} is not valid; expected one of {DATA_MODES} (from "
                f"dm.configure(mode=...), "
                "the datamodule's mode=, or the LightningModule's data_mode)"
            )
        if mode == "unpaired" and min(self.batch_size, self.eval_batch_size) < 2:
            raise ValueError("unpaired (KTO-style) batches need >= 2 rows: set batch_size and eval_batch_size >= 2")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; completions need an EOS")
        return tokenizer, mode

    # ---- setup ----

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, derive the mode's records and tokenize both splits (idempotent)."""
        tokenizer, mode = self._resolve()
        key = (id(tokenizer), mode)
        if self._setup_key == key:
            return
        self.tokenizer = tokenizer
        train, val = self._native_records()
        rng_seed = self.seed
        self._datasets = {}
        for role, records in (("train", train), ("val", val)):
            if records is None:
                continue
            derived = self._derive(records, mode, random.Random(rng_seed))
            self._datasets[role] = self._tokenize(derived, mode, role)
        self._setup_key = key

    def _raw(self, split: str) -> list[RawRow]:
        if split not in self._raw_cache:
            self._raw_cache[split] = list(self.read_split(split))
        return self._raw_cache[split]

    def _parse(self, split: str, role: str) -> list[dict]:
        records, skips = [], Counter()
        for source, number, row in self._raw(split):
            where = f"{source}: row {number}"
            if not isinstance(row, dict):
                raise DataValidationError(f"{where}: expected a JSON object, got {type(row).__name__}")
            try:
                records.append(self.parse_row(row, where))
            except SkipRow as skip:
                skips[str(skip)] += 1
        self.skip_stats[role] = skips
        for reason, count in skips.items():
            rank_zero_info(f"{type(self).__name__}: {role} split '{split}': skipped {count} rows: {reason}")
        if not records:
            raise ValueError(f"{type(self).__name__}: split '{split}' of {self.data_path} has no usable rows")
        return records

    def _native_records(self) -> tuple[list[dict], list[dict] | None]:
        train = self._parse(self.train_split, "train")
        val = None
        if self.holdout > 0:
            if self.holdout >= len(train):
                raise ValueError(f"holdout={self.holdout} leaves no train rows (the train split has {len(train)})")
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            val = [train[i] for i in order[: self.holdout]]
            train = [train[i] for i in order[self.holdout :]]
            rank_zero_info(
                f"{type(self).__name__}: validation = {self.holdout} rows held out of train split "
                f"'{self.train_split}' (seed {self.seed}); val_split={self.val_split!r} is not used"
            )
        elif self.val_split is not None:
            val = self._parse(self.val_split, "val")
        shuffled = self.holdout > 0
        if self.limit_train is not None:
            train = (train if shuffled else self._seeded_shuffle(train))[: self.limit_train]
        if val is not None and self.limit_val is not None:
            val = (val if shuffled else self._seeded_shuffle(val))[: self.limit_val]
        return train, val

    def _seeded_shuffle(self, records: list[dict]) -> list[dict]:
        records = list(records)
        random.Random(self.seed).shuffle(records)
        return records

    def _derive(self, records: list[dict], mode: str, rng: random.Random) -> list[dict]:
        if mode == self.native_mode:
            return records
        if self.native_mode == "pair":
            if mode == "prompt":
                return [{PROMPT: r[PROMPT], REFERENCE: r[CHOSEN]} for r in records]
            if mode == "text":
                return [{PROMPT: r[PROMPT], COMPLETION: r[CHOSEN]} for r in records]
            if mode == "unpaired":
                out = []
                for r in records:
                    out.append({PROMPT: r[PROMPT], COMPLETION: r[CHOSEN], LABEL: True})
                    out.append({PROMPT: r[PROMPT], COMPLETION: r[REJECTED], LABEL: False})
                rng.shuffle(out)  # one prompt's two completions must not sit next to each other
                return out
        if self.native_mode == "unpaired" and mode == "prompt":
            return [{PROMPT: r[PROMPT]} for r in records]
        if self.native_mode in ("unpaired", "prompt") and mode == "text" and REFERENCE in records[0]:
            return [{PROMPT: r[PROMPT], COMPLETION: r[REFERENCE]} for r in records]
        raise ValueError(f"{type(self).__name__} provides {self.native_mode} data; it cannot serve mode {mode!r}")

    # ---- tokenization and truncation ----

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _tokenize(self, records: list[dict], mode: str, role: str) -> TokenizedDataset:
        eos = self.tokenizer.eos_token_id
        stats = {"rows": len(records), "prompt_truncated": 0, "completion_truncated": 0}
        items: list[dict] = []
        if mode == "text" and TEXT in records[0]:
            texts = [r[TEXT] for r in records]
            for text, ids in zip(texts, self._encode(texts), strict=True):
                ids = ids + [eos]
                if len(ids) > self.max_length:
                    ids, stats["completion_truncated"] = (
                        ids[: self.max_length],
                        stats["completion_truncated"] + 1,
                    )
                items.append({"prompt_ids": [], "completion_ids": ids, TEXT: text})
        else:
            prompts = self._encode([r[PROMPT] for r in records])
            for i, ids in enumerate(prompts):
                if len(ids) > self.max_prompt_length:
                    prompts[i] = ids[len(ids) - self.max_prompt_length :]
                    stats["prompt_truncated"] += 1
            fields = {"pair": (CHOSEN, REJECTED), "unpaired": (COMPLETION,), "text": (COMPLETION,)}.get(mode, ())
            encoded = {f: self._encode([r[f] for r in records]) for f in fields}
            for i, (record, prompt_ids) in enumerate(zip(records, prompts, strict=True)):
                item = {"prompt_ids": prompt_ids, **record}
                budget = self.max_length - len(prompt_ids)
                cut = False
                for f in fields:
                    ids = encoded[f][i] + [eos]
                    cut |= len(ids) > budget
                    item[f"{f}_ids"] = ids[:budget]
                stats["completion_truncated"] += cut
                if mode == "text":
                    item[TEXT] = record[PROMPT] + record[COMPLETION]
                items.append(item)
        self.truncation_stats[role] = stats
        rank_zero_info(
            f"{type(self).__name__}: {role} ({mode}): {stats['rows']} rows, {stats['prompt_truncated']} "
            f"prompt-truncated (> {self.max_prompt_length} tokens, tail kept), "
            f"{stats['completion_truncated']} "
            f"completion-truncated (prompt + completion > {self.max_length} tokens, head kept)"
        )
        return TokenizedDataset(items, records, mode)

    # ---- accessors and loaders ----

    @property
    def data_mode(self) -> str | None:
        """The mode the datasets were built for (after ``setup``)."""
        return self._setup_key[1] if self._setup_key else None

    def _role(self, split: str) -> str:
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_ALIASES)}")
        if self._setup_key is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet")
        return _SPLIT_ALIASES[split]

    def dataset(self, split: str) -> TokenizedDataset:
        """The tokenized dataset of ``split`` ("train" or "val"/"validation"/"test"); item i has index i."""
        role = self._role(split)
        if role not in self._datasets:
            raise ValueError(f"{type(self).__name__} has no {role} split (val_split=None and holdout=0)")
        return self._datasets[role]

    def probe_batch(self, split: str, mode: str, size: int) -> dict[str, Any]:
        """The first ``size`` rows of ``split`` in data mode ``mode``, tokenized and collated into one batch.

        A fixed probe set for diagnostics that need another mode than the one being trained on (e.g. chosen /
        rejected pairs while KTO trains on unpaired rows). Same rows on every rank and every call.
        """
        if mode not in DATA_MODES:
            raise ValueError(f"unknown data mode {mode!r}; expected one of {DATA_MODES}")
        role = self._role(split)
        if mode == self.data_mode:
            data = self.dataset(split)
            items = [data[i] for i in range(min(size, len(data)))]
        else:
            records = dict(zip(("train", "val"), self._native_records(), strict=True))[role]
            if records is None:
                raise ValueError(f"{type(self).__name__} has no {role} split (val_split=None and holdout=0)")
            derived = self._derive(records, mode, random.Random(self.seed))[:size]
            saved_stats = dict(self.truncation_stats)
            data = self._tokenize(derived, mode, role)
            self.truncation_stats = saved_stats  # the probe's truncation must not overwrite the split's counts
            items = [data[i] for i in range(len(data))]
        if not items:
            raise ValueError(f"{type(self).__name__}: split {split!r} is empty; no probe batch")
        return Collator(mode, self._pad_id(), self.max_length)(items)

    def has_split(self, split: str) -> bool:
        return self._role(split) in self._datasets

    def dataloader(self, split: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """A DataLoader over ``split``; unshuffled by default (e.g. to precompute reference log-probs by
        index).

        In unpaired mode, a final batch of exactly one row (which cannot form a KL pair) is dropped and
        counted
        in ``dropped_rows``; the train loader (``train_dataloader``) always drops its last partial batch.
        """
        role = self._role(split)
        data = self.dataset(split)
        size = batch_size or (self.batch_size if role == "train" else self.eval_batch_size)
        return self._loader(data, role, shuffle, size, drop_last_partial=False)

    def _loader(self, data: TokenizedDataset, role: str, shuffle: bool, size: int, drop_last_partial: bool):
        drop_last = False
        if data.mode == "unpaired":
            world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
            per_rank = -(-len(data) // world)  # DistributedSampler pads every rank to ceil(n / world)
            remainder = per_rank % size
            if drop_last_partial or remainder == 1:
                drop_last = True
                self.dropped_rows[role] = remainder
                if remainder:
                    rank_zero_info(
                        f"{type(self).__name__}: {role} loader (unpaired, batch size {size}): dropping "
                        f"the final "
                        f"batch of {remainder} row(s) per rank ({len(data)} rows, world size {world})"
                    )
            else:
                self.dropped_rows[role] = 0
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        sampler = None
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        if role == "train" and world > 1:
            # Lightning's own distributed sampler always shuffles training data; ours honours ``shuffle`` and ``seed``
            # (Lightning still calls ``set_epoch`` on it).
            sampler = DistributedSampler(
                data, num_replicas=world, rank=self.trainer.global_rank, shuffle=shuffle, seed=self.seed
            )
            shuffle, generator = False, None
        return DataLoader(
            data,
            batch_size=size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=Collator(data.mode, self._pad_id(), self.max_length),
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def train_dataloader(self) -> DataLoader:
        data = self.dataset("train")
        return self._loader(data, "train", self.shuffle, self.batch_size, drop_last_partial=data.mode == "unpaired")

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_split("val"):
            return []
        return self._loader(self.dataset("val"), "val", False, self.eval_batch_size, drop_last_partial=False)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
