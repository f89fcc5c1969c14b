"""Train loaders that resume exactly: a per-epoch seeded order and a position saved in Lightning's checkpoints.

Lightning saves ``state_dict()`` of every train DataLoader that has one in its checkpoints and hands it back through
``load_state_dict`` before iterating again. ``ResumableDataLoader`` saves (epoch, batches consumed, batch size,
ranks); the resumed iteration starts after those rows of the same epoch order, so no row is trained twice or
skipped (with another batch size or number of ranks, as nearly as whole batches allow, and a warning counts the
rest). The order of epoch ``e`` is a permutation seeded by ``seed + e`` (``DistributedSampler``'s rule, on one
process too), so it does not depend on how many epochs the process has already iterated.

With ``lengths`` the sampler groups rows of similar length into the same batch (``length_grouped``), so less of
each batch is padding; the grouping is a function of (seed, epoch) too, so it resumes the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# Rows are sorted by length within windows of this many global batches: enough to group lengths well, few enough
# that a window still mixes the epoch's order (transformers' LengthGroupedSampler uses 50 too).
LENGTH_GROUP_WINDOW = 50


def length_grouped(
    order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator, window: int = LENGTH_GROUP_WINDOW
) -> list[int]:
    """``order`` regrouped so that each run of ``batch_size`` rows has similar lengths.

    ``order`` is cut into windows of ``window × batch_size`` rows; each window is sorted by length (longest first)
    and cut into batches; the full batches are then put in a random order drawn from ``generator`` (so long and
    short batches alternate through the epoch), and a final partial batch stays last. Every row of ``order``
    appears exactly once.
    """
    span = window * batch_size
    batches: list[list[int]] = []
    for begin in range(0, len(order), span):
        rows = sorted(order[begin : begin + span], key=lambda i: -lengths[i])
        batches += [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) < batch_size]
    shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in shuffled + partial for i in batch]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order seeded by ``seed + epoch``, rows split across ranks) that can start the next
    iteration ``start`` rows into the epoch's order. Also used with one process, so Lightning keeps it as is.

    With ``lengths`` (one per row) the epoch's order is ``length_grouped`` in global batches of
    ``batch_size × num_replicas`` rows before it is split across ranks, so the i-th batch of every rank comes from
    the same group of similar lengths.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        lengths: list[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(dataset)} rows")
        self.lengths, self.batch_size = lengths, batch_size
        self.start = 0

    def epoch_order(self) -> list[int]:
        """Every row index of this epoch in training order, before the split across ranks."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        if self.lengths is not None:
            order = length_grouped(order, self.lengths, self.batch_size * self.num_replicas, generator)
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        order += (order * math.ceil(self.total_size / max(len(order), 1)))[: self.total_size - len(order)]
        indices = order[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0  # a resume skips once
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` whose position in the epoch travels in Lightning's checkpoints.

    ``state_dict()`` = ``{"epoch", "batches"}``: the batches of that epoch the training loop has consumed.
    ``load_state_dict`` makes the next iteration of that same epoch skip them (the rows, before any collation).
    Batches of a finished epoch skip nothing: the next epoch starts from its first batch.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        # a generator of its own: creating an iterator draws a seed from it instead of from the global RNG
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._yielded = 0
        self._resume_at: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler
        skip = 0
        if self._resume_at is not None:
            state, self._resume_at = self._resume_at, None
            if state["epoch"] == sampler.epoch:
                skip = self.batches_to_skip(state)
        sampler.start = skip * self.batch_size
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def batches_to_skip(self, state: dict[str, int]) -> int:
        """This loader's batches that cover the rows the checkpoint's loader consumed of the same epoch.

        k batches of b rows on each of W ranks consumed exactly the first k·b·W rows of the epoch's order
        (``DistributedSampler`` deals rows to ranks in turn). With another batch size or number of ranks the resume
        skips the whole global batches that fit in them; the rest of those rows are trained again, and a warning
        counts them. A length-grouped order is grouped by the global batch, so it changes with it (warned).
        """
        sampler: ResumableSampler = self.sampler
        global_batch = self.batch_size * sampler.num_replicas
        saved_batch = state.get("batch_size", self.batch_size) * state.get("ranks", sampler.num_replicas)
        consumed = state["batches"] * saved_batch
        skip = consumed // global_batch
        if skip >= len(self):
            return 0  # the epoch was finished: the next one starts from its first batch
        if saved_batch != global_batch and consumed:
            changed = f"resumed mid-epoch {sampler.epoch} with a global batch of {global_batch} rows, not {saved_batch}"
            if sampler.lengths is not None:
                warnings.warn(
                    f"{changed}: the length-grouped order depends on it, so rows of this epoch may be trained twice or "
                    "skipped",
                    stacklevel=2,
                )
            elif again := consumed - skip * global_batch:
                warnings.warn(f"{changed}: {again} rows the checkpoint had trained on are trained again", stacklevel=2)
        return skip

    def state_dict(self) -> dict[str, int]:
        # Lightning fetches a sized loader's batches on demand (no look-ahead), so at a checkpoint every batch
        # yielded has been trained on
        return {
            "epoch": self.sampler.epoch,
            "batches": self._yielded,
            "batch_size": self.batch_size,
            "ranks": self.sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = {key: int(value) for key, value in state_dict.items()}
