"""Train loaders that resume exactly: a per-epoch seeded order and a position saved in Lightning's checkpoints.

Lightning saves ``state_dict()`` of every train DataLoader that has one in its checkpoints and hands it back through
``load_state_dict`` before iterating again. ``ResumableDataLoader`` saves (epoch, batches consumed); the resumed
iteration starts after those batches of the same epoch order, so no row is trained twice or skipped. The order of
epoch ``e`` is a permutation seeded by ``seed + e`` (``DistributedSampler``'s rule, on one process too), so it does
not depend on how many epochs the process has already iterated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order seeded by ``seed + epoch``, rows split across ranks) that can start the next
    iteration ``start`` rows into the epoch's order. Also used with one process, so Lightning keeps it as is."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
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
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler
        skip = 0
        if self._resume_at is not None:
            epoch, batches = self._resume_at
            self._resume_at = None
            if epoch == sampler.epoch and batches < len(self):
                skip = batches
        sampler.start = skip * self.batch_size
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        # Lightning fetches a sized loader's batches on demand (no look-ahead), so at a checkpoint every batch
        # yielded has been trained on
        return {"epoch": self.sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))
