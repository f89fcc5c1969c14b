"""Reading raw rows and validating their fields: where every ``DataValidationError`` comes from.

Owns the first step of a DataModule's pipeline, before any tokenizer exists: a *raw row* is ``(source, row_number,
row)`` (``RawRow``) read from a local ``.jsonl`` / ``.jsonl.gz`` (``read_json_file``) or a Hugging Face Hub split
(``read_hub``); a benchmark's ``parse_row`` turns it into a canonical record with the field checks here
(``require_str``, ``require_type``). Bad input raises ``DataValidationError`` whose message names the file (or Hub
split), the 1-based row number and the field; a valid row that a benchmark cannot use by design raises ``SkipRow``
(the DataModule counts and logs skips by reason). Nothing here knows about tokenization, data modes or batches.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

RawRow = tuple[str, int, dict]  # (source: file path or hub id[split], 1-based row number, row)


class DataValidationError(ValueError):
    """A raw row (or file) is malformed; the message names the file, the 1-based row number and the field."""


class SkipRow(Exception):
    """Raised by ``parse_row`` for a valid row that is unusable by design; counted and logged by reason."""


# ---- field checks for ``parse_row`` ----------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "missing or null" if value is None else type(value).__name__


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


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


# ---- raw rows --------------------------------------------------------------------------------------------


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
    """Every non-blank line of ``path`` as ``(row_number, object)``; the first bad line raises, naming its row."""
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
