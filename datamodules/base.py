"""``BenchmarkDataModule``: the base class of every benchmark DataModule — loading, data modes, the attach hand-off,
loaders.

A benchmark subclass only reads raw rows (``read_split``) and maps each row to a canonical record of its native mode
(``parse_row``, with the checks of ``datamodules/readers.py``). Everything else happens here, for whichever mode the
attached module asks:

========== ======================================= ==============================================
mode       canonical record                        derived from a ``pair`` record
========== ======================================= ==============================================
prompt     ``{prompt, reference?}``                ``{prompt, reference=chosen}``
pair       ``{prompt, chosen, rejected}``          —
unpaired   ``{prompt, completion, label: bool}``   ``(prompt, chosen, True)``,
                                                   ``(prompt, rejected, False)``, shuffled (seed)
text       ``{text}`` or ``{prompt, completion}``  ``{prompt, completion=chosen}``
========== ======================================= ==============================================

Lifecycle (the *attach contract*):

0. ``prepare_data`` — under a Trainer, ``AlignmentModule.prepare_data`` attaches (step 2) and calls
   ``prepare_tokenized(stage)`` on one process per node while the others wait: the splits the stage reads are
   tokenized into the on-disk cache once, and every rank loads them at step 3.
1. ``setup(stage)`` — Lightning calls it *before* ``LightningModule.setup``. It reads and validates the raw rows of
   both splits and builds the native records (holdout, limits, skips); no tokenizer is needed, so bad data fails
   here, before any model is built. Benchmarks whose records depend on the tokenizer (``parse_needs_tokenizer``: a
   chat template, a BOS prompt) only read their files here and parse them on first use after ``attach``.
2. ``attach(tokenizer, data_mode)`` — the one explicit hand-off from the module (``AlignmentModule.setup`` calls
   ``trainer.datamodule.attach(self.tokenizer, self.data_mode)``; without a Trainer, call it yourself). The
   DataModule's own ``mode=`` argument wins over the attached ``data_mode``.
3. First use of a split (``dataset``, ``dataloader``, ``probe_batch``, ``train_dataloader``, …) derives the mode's
   records and tokenizes that split with ``datasets.map`` (``datamodules/collation.py``), or loads it from the
   cache when the same texts were tokenized with the same tokenizer and settings before (``cache_tokenized``,
   ``cache_dir``); once per (tokenizer, mode): repeated calls, and re-attaching the same tokenizer and mode, reuse
   the datasets. Using a DataModule that was never attached raises ``NotAttachedError``.

Tokenization and truncation are described in ``datamodules/collation.py``. Truncated rows are counted per split in
``truncation_stats``; skipped rows in ``skip_stats``; rows dropped to avoid size-1 unpaired batches in
``dropped_rows``. Every count is also logged. The string lists in a batch hold the untruncated text of each record.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import datasets
import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.collation import Collator, TokenizedDataset, default_cache_dir, tokenize_records
from datamodules.keys import (
    CHOSEN,
    COMPLETION,
    DATA_MODES,
    LABEL,
    PROMPT,
    REFERENCE,
    REJECTED,
)
from datamodules.readers import (
    DataValidationError,
    RawRow,
    SkipRow,
    read_hub,
    read_json_file,
)
from datamodules.sampling import ResumableDataLoader, ResumableSampler

_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "val"}


class NotAttachedError(ValueError):
    """The DataModule needs a tokenizer (and a data mode) that nobody attached."""


class BenchmarkDataModule(LightningDataModule):
    """Base class of every benchmark: loads, validates, derives the requested mode, tokenizes and collates.

    Subclasses set ``native_mode`` / ``default_data_path`` and implement ``parse_row`` (and, if their files
    are not ``<data_path>/<split>.jsonl(.gz)`` or a plain Hub split, ``read_split``). A ``parse_row`` that reads
    ``self.tokenizer`` must set ``parse_needs_tokenizer = True``. Without a Trainer::

        dm = HHDataModule(...).attach(tokenizer, "pair")
        batch = next(iter(dm.train_dataloader()))
    """

    native_mode: ClassVar[str] = "pair"
    default_data_path: ClassVar[str | None] = None
    parse_needs_tokenizer: ClassVar[bool] = False  # parse_row reads self.tokenizer (chat template, BOS, ...)

    def __init__(
        self,
        data_path: str | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        test_split: str | None = None,
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
        shuffle_seed: int | None = None,
        group_by_length: bool = False,
        num_proc: int | None = None,
        cache_tokenized: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            data_path: Hub dataset id, local directory or single file (default: the benchmark's Hub id).
            train_split: split (file stem / Hub split) used for training.
            val_split: split used for validation; ``None`` for none (unless ``holdout`` > 0).
            test_split: split used by ``test`` (e.g. the dataset's test split when validation is a ``holdout``);
                ``None``: ``test`` evaluates the validation set.
            holdout: if > 0, carve this many rows (seeded shuffle) out of the train split as the
                validation set; it then replaces ``val_split``. Train and holdout are disjoint.
            limit_train: keep the first N train rows after a seeded shuffle (and after the holdout).
            limit_val: keep the first N validation rows after a seeded shuffle.
            batch_size: training batch size.
            eval_batch_size: validation batch size (default ``batch_size``).
            max_length: maximum prompt + completion tokens (completion head kept).
            max_prompt_length: maximum prompt tokens (tail kept); must be < ``max_length``.
            mode: data mode (one of ``DATA_MODES``); wins over the ``data_mode`` given to ``attach`` (i.e. over the
                attached LightningModule's ``data_mode``).
            num_workers: DataLoader workers.
            seed: seed of every shuffle here (holdout, limits, unpaired order, train loader).
            shuffle: shuffle the train loader.
            shuffle_seed: seed of the train loader's order alone (default ``seed``): runs that differ only in the
                order they see the same training rows, with the same holdout and limits (e.g. a sweep's seeds).
            group_by_length: put rows of similar token length in the same train batch, so less of each batch is
                padding (``datamodules.sampling.length_grouped``: sorted within windows of 50 batches, the batches
                then shuffled; seeded by ``seed`` + epoch, resumable, the same groups split across DDP ranks).
                Every row is still seen once per epoch; batches are no longer uniform random samples.
            num_proc: processes ``datasets.map`` tokenizes with (``None``: this process only).
            cache_tokenized: keep tokenized splits on disk, keyed by their texts, the tokenizer and the truncation
                settings; a later run (and every other rank) loads them instead of tokenizing again. Off when
                ``datasets.disable_caching()`` was called.
            cache_dir: where; default ``<HF_DATASETS_CACHE>/lit_align_tokenized``.
        """
        super().__init__()
        self.save_hyperparameters()  # in checkpoints: an exported policy's model card names its data
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
        for name, limit in (("limit_train", limit_train), ("limit_val", limit_val)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1 (or None: every row), got {limit}")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        self.data_path = data_path if data_path is not None else self.default_data_path
        if self.data_path is None:
            raise ValueError(f"{type(self).__name__} needs data_path (a Hub id, local directory or file)")
        self.train_split, self.val_split, self.holdout = train_split, val_split, holdout
        self.test_split = test_split
        self.limit_train, self.limit_val = limit_train, limit_val
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.mode, self.num_workers, self.seed, self.shuffle = mode, num_workers, seed, shuffle
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.group_by_length = group_by_length
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"num_proc must be >= 1 (or None), got {num_proc}")
        self.num_proc, self.cache_tokenized, self.cache_dir = num_proc, cache_tokenized, cache_dir
        self._tokenizer: Any = None
        self._attached_mode: str | None = None
        self._raw_cache: dict[str, list[RawRow]] = {}
        self._native: tuple[list[dict], list[dict] | None] | None = None  # native records (train, val)
        self._native_key: int | None = None  # id of the tokenizer they were parsed with (parse_needs_tokenizer)
        self._datasets: dict[str, TokenizedDataset] = {}
        self._built_key: tuple[int, str] | None = None  # (id(tokenizer), mode) of ``_datasets``
        self.truncation_stats: dict[str, dict[str, int]] = {}
        self.skip_stats: dict[str, Counter] = {}
        self.dropped_rows: dict[str, int] = {}
        self.tokenization_log: list[tuple[str, str, int, float]] = []  # (role, "tokenized"/"cache", rows, seconds)

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

    # ---- the attach hand-off ----

    def attach(self, tokenizer: Any, data_mode: str | None = None) -> BenchmarkDataModule:
        """Give this DataModule the tokenizer and data mode of the module it feeds; returns ``self``.

        ``AlignmentModule.setup`` calls it on the trainer's DataModule; call it yourself to use the DataModule
        without a Trainer. The DataModule's own ``mode=`` wins over ``data_mode`` (``data_mode`` may then be
        ``None``). Idempotent: the same tokenizer and mode keep the tokenized datasets; another tokenizer or mode
        rebuilds them on first use.
        """
        if tokenizer is None:
            raise NotAttachedError(f"{type(self).__name__}.attach: the tokenizer is None")
        if data_mode is not None and data_mode not in DATA_MODES:
            raise ValueError(f"data_mode={data_mode!r} is not a data mode; expected one of {DATA_MODES}")
        mode = self.mode or data_mode
        if mode is None:
            raise ValueError(
                f"{type(self).__name__}.attach: no data mode (pass data_mode=, one of {DATA_MODES}, or the "
                "datamodule's mode=)"
            )
        if mode == "unpaired" and min(self.batch_size, self.eval_batch_size) < 2:
            raise ValueError("unpaired (KTO-style) batches need >= 2 rows: set batch_size and eval_batch_size >= 2")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; completions need an EOS")
        self._tokenizer, self._attached_mode = tokenizer, data_mode
        return self

    def configure(self, tokenizer: Any, mode: str | None = None) -> BenchmarkDataModule:
        """Deprecated alias of ``attach(tokenizer, mode)``."""
        warnings.warn("BenchmarkDataModule.configure is deprecated; use attach", DeprecationWarning, stacklevel=2)
        return self.attach(tokenizer, mode)

    @property
    def tokenizer(self) -> Any:
        """The attached tokenizer; raises ``NotAttachedError`` before ``attach``."""
        if self._tokenizer is None:
            raise NotAttachedError(
                f"{type(self).__name__} has no tokenizer: call dm.attach(tokenizer, data_mode) or fit it with a "
                "lit-align module (its setup attaches its tokenizer and data_mode)"
            )
        return self._tokenizer

    @property
    def data_mode(self) -> str | None:
        """The mode batches are built for: the DataModule's ``mode=``, else the attached ``data_mode`` (else None)."""
        return self.mode or self._attached_mode

    # ---- setup: raw rows and native records (no tokenizer) ----

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the raw rows of both splits and build the native records (idempotent).

        Needs no tokenizer: Lightning runs this before ``LightningModule.setup`` attaches one. With
        ``parse_needs_tokenizer`` (and nothing attached yet) only the files are read; rows are parsed on first use.
        """
        if self.parse_needs_tokenizer and self._tokenizer is None:
            for split in self._source_splits():
                self._raw(split)
        else:
            self._native_records()

    def _source_splits(self) -> list[str]:
        with_val = self.holdout == 0 and self.val_split is not None
        return [self.train_split, self.val_split] if with_val else [self.train_split]

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
            except NotAttachedError as err:
                raise NotAttachedError(
                    f"{err}. {type(self).__name__}.parse_row reads the tokenizer: declare parse_needs_tokenizer = True"
                ) from err
        self.skip_stats[role] = skips
        for reason, count in skips.items():
            rank_zero_info(f"{type(self).__name__}: {role} split '{split}': skipped {count} rows: {reason}")
        if not records:
            source = self.data_path if isinstance(self.data_path, str) else "the in-memory dataset"
            if not skips:
                raise DataValidationError(f"{type(self).__name__}: split '{split}' of {source} is empty (0 rows)")
            reasons = "; ".join(f"{count} × {reason}" for reason, count in skips.items())
            raise DataValidationError(
                f"{type(self).__name__}: split '{split}' of {source} has no usable rows: all {sum(skips.values())} "
                f"were skipped ({reasons})"
            )
        return records

    def _native_records(self) -> tuple[list[dict], list[dict] | None]:
        """(train, val) native records after holdout and limits; parsed once (per tokenizer, if parsing needs it)."""
        key = id(self.tokenizer) if self.parse_needs_tokenizer else None
        if self._native is None or self._native_key != key:
            self._native, self._native_key = self._split_records(), key
        return self._native

    def _split_records(self) -> tuple[list[dict], list[dict] | None]:
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

    def _test_records(self) -> list[dict]:
        """Native records of ``test_split`` (``limit_val`` applies after a seeded shuffle, as for validation)."""
        records = self._parse(self.test_split, "test")
        if self.limit_val is not None:
            records = self._seeded_shuffle(records)[: self.limit_val]
        return records

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

    # ---- first use: derive the mode and tokenize ----

    def _resolve(self) -> tuple[Any, str]:
        """The attached tokenizer and the effective mode; ``NotAttachedError`` before ``attach``."""
        tokenizer = self.tokenizer  # attach() also set a mode: the datamodule's mode= or the attached one
        return tokenizer, self.data_mode

    def tokenized_cache_dir(self) -> str | None:
        """Where tokenized splits are cached, or ``None`` when caching is off."""
        if not self.cache_tokenized or not datasets.is_caching_enabled():
            return None
        return self.cache_dir or default_cache_dir()

    def _tokenize(
        self, records: list[dict], mode: str, role: str, cache: bool = True
    ) -> tuple[TokenizedDataset, dict[str, int]]:
        started = time.perf_counter()
        data, stats = tokenize_records(
            records,
            mode,
            self.tokenizer,
            self.max_length,
            self.max_prompt_length,
            cache_dir=self.tokenized_cache_dir() if cache else None,
            num_proc=self.num_proc,
        )
        self.tokenization_log.append((role, data.source, len(data), time.perf_counter() - started))
        how = "loaded from the tokenized cache" if data.source == "cache" else "tokenized"
        rank_zero_info(
            f"{type(self).__name__}: {role} ({mode}, {how}): {stats['rows']} rows, {stats['prompt_truncated']} "
            f"prompt-truncated (> {self.max_prompt_length} tokens, tail kept), "
            f"{stats['completion_truncated']} "
            f"completion-truncated (prompt + completion > {self.max_length} tokens, head kept)"
        )
        return data, stats

    def _built(self, role: str) -> TokenizedDataset | None:
        """The tokenized dataset of ``role`` for the attached (tokenizer, mode): built (or loaded from the cache) on
        first use and then reused; ``None`` when the DataModule has no such split."""
        tokenizer, mode = self._resolve()
        if self._built_key != (id(tokenizer), mode):
            self._datasets, self._built_key = {}, (id(tokenizer), mode)
        if role not in self._datasets:
            if role == "test":
                records = self._test_records() if self.test_split is not None else None
            else:
                records = dict(zip(("train", "val"), self._native_records(), strict=True))[role]
            if records is None:
                return None
            derived = self._derive(records, mode, random.Random(self.seed))
            self._datasets[role], self.truncation_stats[role] = self._tokenize(derived, mode, role)
        return self._datasets[role]

    def prepare_tokenized(self, stage: str = "fit") -> None:
        """Tokenize the splits ``stage`` reads into the on-disk cache (nothing when caching is off).

        ``AlignmentModule.prepare_data`` calls it after attaching: Lightning runs that on one process per node
        while the others wait, so a multi-process run tokenizes once and every rank then loads the cache.
        """
        if self.tokenized_cache_dir() is None:
            return
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": [self.predict_split()]}
        for split in splits.get(stage, []):
            if self.has_split(split):
                self._built(self._role(split))

    # ---- accessors and loaders ----

    def _role(self, split: str) -> str:
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_ALIASES)}")
        if split == "test" and self.test_split is not None:
            return "test"
        return _SPLIT_ALIASES[split]

    def has_split(self, split: str) -> bool:
        """Whether ``split`` exists (train always; val with ``val_split`` or ``holdout``; test with ``test_split``,
        else as val). Needs no ``attach``."""
        role = self._role(split)
        return role in ("train", "test") or self.holdout > 0 or self.val_split is not None

    def dataset(self, split: str) -> TokenizedDataset:
        """The tokenized dataset of ``split`` ("train" or "val"/"validation"/"test"); item i has index i."""
        role = self._role(split)
        data = self._built(role)
        if data is None:
            raise ValueError(f"{type(self).__name__} has no {role} split (val_split=None and holdout=0)")
        return data

    def probe_batch(self, split: str, mode: str, size: int) -> dict[str, Any]:
        """The first ``size`` rows of ``split`` in data mode ``mode``, tokenized and collated into one batch.

        A fixed probe set for diagnostics that need another mode than the one being trained on (e.g. chosen /
        rejected pairs while KTO trains on unpaired rows). Same rows on every rank and every call.
        """
        if mode not in DATA_MODES:
            raise ValueError(f"unknown data mode {mode!r}; expected one of {DATA_MODES}")
        role = self._role(split)
        if mode == self._resolve()[1]:
            data = self.dataset(split)
            items = [data[i] for i in range(min(size, len(data)))]
        else:
            train, val = self._native_records()
            records = {"train": train, "val": val}.get(role) if role != "test" else self._test_records()
            if records is None:
                raise ValueError(f"{type(self).__name__} has no {role} split (val_split=None and holdout=0)")
            derived = self._derive(records, mode, random.Random(self.seed))[:size]
            data, _ = self._tokenize(derived, mode, role, cache=False)  # the probe's truncation is not the split's
            items = [data[i] for i in range(len(data))]
        if not items:
            raise ValueError(f"{type(self).__name__}: split {split!r} is empty; no probe batch")
        return Collator(mode, self._pad_id(), self.max_length)(items)

    def dataloader(self, split: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """A DataLoader over ``split``; unshuffled by default (e.g. to precompute reference log-probs by
        index).

        In unpaired mode, a final batch of exactly one row (which cannot form a KL pair) is dropped and
        counted in ``dropped_rows``; the train loader (``train_dataloader``) always drops its last partial batch.
        """
        role = self._role(split)
        data = self.dataset(split)
        size = batch_size or (self.batch_size if role == "train" else self.eval_batch_size)
        return self._loader(data, role, shuffle, size, drop_last_partial=False)

    def _loader(
        self, data: TokenizedDataset, role: str, shuffle: bool, size: int, drop_last_partial: bool
    ) -> DataLoader:
        drop_last = False
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        if data.mode == "unpaired":
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
        collate = Collator(data.mode, self._pad_id(), self.max_length)
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if role == "train":
            # Lightning's own distributed sampler always shuffles training data; ours honours ``shuffle``, seeds
            # each epoch's order by shuffle_seed + epoch (Lightning calls ``set_epoch``) and resumes mid-epoch from
            # a checkpoint (datamodules/sampling.py)
            rank = self.trainer.global_rank if world > 1 else 0
            lengths = data.lengths() if self.group_by_length else None
            sampler = ResumableSampler(
                data,
                num_replicas=world,
                rank=rank,
                shuffle=shuffle,
                seed=self.shuffle_seed,
                lengths=lengths,
                batch_size=size,
            )
            return ResumableDataLoader(
                data, sampler, batch_size=size, drop_last=drop_last, collate_fn=collate, **workers
            )
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            data,
            batch_size=size,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=collate,
            generator=generator,
            **workers,
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
        """The ``test_split`` when one is set, else the validation set."""
        if not self.has_split("test"):
            return []
        return self._loader(self.dataset("test"), "test", False, self.eval_batch_size, drop_last_partial=False)

    def predict_dataloader(self) -> DataLoader:
        """Prompts for ``lit-align predict``: the validation set, or the train split when there is none (in order)."""
        data = self.dataset(self.predict_split())
        return self._loader(data, "predict", False, self.eval_batch_size, drop_last_partial=False)

    def predict_split(self) -> str:
        """The split ``lit-align predict`` reads: the validation set, or the train split when there is none."""
        return "val" if self.has_split("val") else "train"
