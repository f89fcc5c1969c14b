"""Tables of sampled completions for every logger a trainer has.

``log_completions_table(trainer, key, rows, step)`` sends one table (columns ``prompt``, ``completion``, then
``reward`` and any other columns the rows carry) to each of ``trainer.loggers`` in the form that logger can show:

* ``WandbLogger``: a ``wandb.Table`` through ``logger.log_table``;
* ``TensorBoardLogger``: a Markdown table through ``add_text`` (the TEXT tab renders it);
* any other logger with a local ``log_dir`` (``CSVLogger``, ...): one JSON object per row appended to
  ``<log_dir>/<key with "/" replaced by "_">.jsonl``, each with a ``step`` field;
* a logger with neither (e.g. ``MLFlowLogger`` with a remote store) is skipped with one warning.

Only global rank 0 writes. The logger classes come from ``lightning.pytorch.loggers``, which imports without
tensorboard or wandb installed; those packages are needed only when such a logger is configured (extras
``lit-align[tensorboard]``, ``lit-align[wandb]``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

LEADING_COLUMNS = ("prompt", "completion")
_warned_unsupported: set[str] = set()


def _plain(value: Any) -> Any:
    """A JSON-friendly Python value: tensors and numpy scalars become numbers (one element) or lists."""
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    return value


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``prompt``, ``completion``, ``reward`` (when present), then every other column in first-seen order."""
    columns = list(LEADING_COLUMNS)
    if any("reward" in row for row in rows):
        columns.append("reward")
    for row in rows:
        for name in row:
            if name not in columns:
                columns.append(name)
    return columns


def _cell_text(value: Any) -> str:
    """One Markdown table cell: numbers shortened, ``|`` escaped, line breaks shown as ``<br>``."""
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, float):
        text = str(value) if math.isnan(value) or math.isinf(value) else f"{value:.4g}"
    else:
        text = str(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """The rows as a GitHub-style Markdown table (what TensorBoard's text plugin renders)."""
    columns = list(columns) if columns is not None else table_columns(rows)
    lines = [
        "| " + " | ".join(_cell_text(name) for name in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell_text(row.get(name)) for name in columns) + " |" for row in rows]
    return "\n".join(lines)


def jsonl_path(log_dir: str | os.PathLike[str], key: str) -> str:
    """Where the JSONL fallback writes ``key``'s rows: ``<log_dir>/<key with "/" → "_">.jsonl``."""
    return os.path.join(os.fspath(log_dir), key.replace("/", "_") + ".jsonl")


def _append_jsonl(log_dir: str, key: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
    os.makedirs(log_dir, exist_ok=True)
    with open(jsonl_path(log_dir, key), "a", encoding="utf-8") as file:
        for row in rows:
            record = {"step": int(step), **{name: _plain(value) for name, value in row.items()}}
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def log_completions_table(trainer: L.Trainer, key: str, rows: list[dict[str, Any]], step: int) -> None:
    """Log ``rows`` (each with ``prompt``, ``completion`` and optionally ``reward`` and other numbers) as a table
    named ``key`` at ``step`` to every logger of ``trainer``; a no-op off global rank 0 or without rows."""
    if not trainer.is_global_zero or not rows:
        return
    missing = [name for name in LEADING_COLUMNS if any(name not in row for row in rows)]
    if missing:
        raise ValueError(f"log_completions_table({key!r}): every row needs {missing}; got keys {sorted(rows[0])}")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    columns = table_columns(rows)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            data = [[_plain(row.get(name)) for name in columns] for row in rows]
            logger.log_table(key=key, columns=columns, data=data, step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(rows, columns), step)
        elif logger.log_dir is not None:
            if isinstance(logger, CSVLogger):
                # create the metrics writer first: made later, it would find a non-empty log dir and warn
                logger.experiment  # noqa: B018
            _append_jsonl(logger.log_dir, key, rows, step)
        elif type(logger).__name__ not in _warned_unsupported:
            _warned_unsupported.add(type(logger).__name__)
            rank_zero_warn(
                f"{type(logger).__name__} has no table support and no local log_dir: completions tables "
                f"({key!r}) are not logged to it"
            )
