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
import os
from collections.abc import Iterator
from typing import Any

RawRow = tuple[str, int, dict]  # (source: file path or hub id[split], 1-based row number, row)
_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".gz")


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

    A 0-byte file, or one with no rows, raises naming the file. If ``datasets`` cannot read the file (bad JSON,
    bytes that are not UTF-8), or a field's type differs between rows, the file is re-read line by line with
    ``json``: a bad line is reported by row number, and the rows are validated with their types exactly as
    written, so a wrong type gets a row-and-field message.
    """
    import datasets

    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataValidationError(f"{path}: the file is empty (0 bytes); expected one JSON object per line")
    try:
        data = datasets.load_dataset("json", data_files=path, split="train")
        # Types that differ between rows make `datasets` fall back to a lossy `Json` feature (it turns the
        # string "1" into the int 1); re-read such files exactly, so validation sees the types as written.
        rows = None if "Json(" in repr(data.features) else data.to_list()  # to_list decodes the strings (UTF-8)
    except Exception:  # noqa: BLE001 — any reader failure becomes a message naming the file
        numbered = _read_json_lines(path)  # names the bad row, or reads rows `datasets` could not type
    else:
        numbered = _read_json_lines(path) if rows is None else list(enumerate(rows, start=1))
    if not numbered:
        raise DataValidationError(f"{path}: the file is empty (no rows, only blank lines)")
    for number, row in numbered:
        yield path, number, row


def _read_json_lines(path: str) -> list[tuple[int, dict]]:
    """Every non-blank line of ``path`` as ``(row_number, object)``; the first bad line raises, naming its row:
    bytes that are not UTF-8, invalid JSON, or a value that is not an object."""
    opener = gzip.open if path.endswith(".gz") else open
    rows, number = [], 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading BOM is allowed
                except UnicodeDecodeError as err:
                    bad = raw[err.start : err.end]
                    raise DataValidationError(
                        f"{path}: row {number}: not valid UTF-8 (byte {bad.hex(' ')} at byte {err.start + 1} of the "
                        "line); save the file as UTF-8"
                    ) from err
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataValidationError(f"{path}: row {number}: invalid JSON: {err}") from err
                if not isinstance(row, dict):
                    raise DataValidationError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
                rows.append((number, row))
    except (OSError, EOFError) as err:
        after = f" after row {number}" if number else ""
        raise DataValidationError(f"{path}: cannot read as JSON lines{after}: {err}") from err
    return rows  # empty only when every line is blank: the caller says the file is empty


def _datasets_offline() -> bool:
    """Whether ``datasets`` may not reach the Hub (``HF_DATASETS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def read_hub(hub_id: str, split: str, **kwargs: Any) -> Iterator[RawRow]:
    """Yield ``(f"{hub_id}[{split}]", row_number, row)`` from a Hugging Face Hub dataset.

    ``hub_id`` is what a DataModule's ``data_path`` names when no local file or directory of that name exists:
    a path-looking one (``./data/hh``, ``/x/y``, ``~/x``, ``a/b/c``, ``x.jsonl``) raises ``FileNotFoundError``
    at once, and a Hub id that cannot be loaded raises a ``DataValidationError`` naming it (offline mode said
    so), not the ``datasets`` traceback.
    """
    import datasets

    if hub_id.startswith(("./", "../", "/", "~", ".\\")) or hub_id.count("/") > 1 or hub_id.endswith(_DATA_SUFFIXES):
        raise FileNotFoundError(f"no such file or directory: {hub_id} (data_path); it is not a Hub dataset id either")
    try:
        data = datasets.load_dataset(hub_id, split=split, **kwargs)
    except Exception as err:  # noqa: BLE001
        config = kwargs or "default config"
        if _datasets_offline():
            raise DataValidationError(
                f"{hub_id}: no local file or directory of that name, and split '{split}' ({config}) of the Hub "
                "dataset is not in the local cache while offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); "
                "pass data_path= a local directory or file"
            ) from err
        raise DataValidationError(
            f"{hub_id}: cannot load split '{split}' ({config}) from the Hub: {err}. "
            "Offline? Pass data_path= a local directory or file instead."
        ) from err
    source = f"{hub_id}[{split}]" + (f"{{{', '.join(f'{k}={v}' for k, v in kwargs.items())}}}" if kwargs else "")
    for number, row in enumerate(data, start=1):
        yield source, number, row
