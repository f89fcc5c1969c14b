"""The train sampler: today's order is DistributedSampler's; ``group_by_length`` groups similar lengths, covers every
row once per epoch, is a function of (seed, epoch), resumes mid-epoch, and gives DDP ranks matching batches."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
import torch
from helpers import hh_pairs
from torch.utils.data import DistributedSampler

from datamodules.sampling import ResumableSampler, length_grouped


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def rank_orders(n: int, world: int, epoch: int, **kwargs) -> list[list[int]]:
    orders = []
    for rank in range(world):
        sampler = ResumableSampler(Rows(n), num_replicas=world, rank=rank, shuffle=True, seed=7, **kwargs)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return orders


@pytest.mark.parametrize(("n", "world"), [(10, 1), (11, 3), (2, 5)])
def test_without_lengths_the_order_is_distributed_samplers(n, world):
    for rank in range(world):
        ours = ResumableSampler(Rows(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
        theirs = DistributedSampler(Rows(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)


def test_length_grouped_batches_hold_neighbouring_lengths_and_every_row_once():
    lengths = [(i * 37) % 101 for i in range(230)]  # 230 rows: windows of 4 batches of 5 = 20 rows, 11.5 windows
    order = torch.randperm(230, generator=torch.Generator().manual_seed(0)).tolist()
    grouped = length_grouped(order, lengths, batch_size=5, generator=torch.Generator().manual_seed(1), window=4)
    assert sorted(grouped) == list(range(230))
    batches = [grouped[k : k + 5] for k in range(0, 230, 5)]
    # each batch is 5 consecutive rows of its window sorted by length: no row of the window lies strictly inside
    # a batch's length range without being in that batch
    windows = [order[k : k + 20] for k in range(0, 230, 20)]
    for batch in batches:
        window = next(w for w in windows if batch[0] in w)
        assert set(batch) <= set(window)
        low, high = min(lengths[i] for i in batch), max(lengths[i] for i in batch)
        inside = {i for i in window if low < lengths[i] < high}
        assert inside <= set(batch)
    # the batches are not in window order (they were shuffled), and the partial batch of 230 % 5 = 0 rows: none
    assert [b[0] for b in batches] != [b[0] for b in sorted(batches, key=lambda b: order.index(b[0]))]


def test_a_partial_final_batch_stays_last():
    lengths = list(range(23))
    grouped = length_grouped(list(range(23)), lengths, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert sorted(grouped) == list(range(23))
    assert sorted(grouped[-3:]) == [0, 1, 2]  # the window sorted longest first: the 3 shortest form the remainder


@pytest.mark.parametrize("world", [1, 2, 3])
def test_grouped_epochs_cover_every_row_once_are_seeded_and_ranks_share_groups(world):
    n, batch = 96, 4
    lengths = [int(x) for x in torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(3))]
    first = rank_orders(n, world, epoch=0, lengths=lengths, batch_size=batch)
    assert first == rank_orders(n, world, epoch=0, lengths=lengths, batch_size=batch)  # deterministic
    assert first != rank_orders(n, world, epoch=1, lengths=lengths, batch_size=batch)  # a new order per epoch
    assert Counter(i for order in first for i in order) == Counter(range(n))  # 96 divides evenly: once each
    # the k-th batch of every rank comes from one global batch of similar lengths: its ranks' ranges overlap far
    # more than random batches' would
    spreads = []
    for k in range(n // (batch * world)):
        rows = [i for order in first for i in order[k * batch : (k + 1) * batch]]
        spreads.append(max(lengths[i] for i in rows) - min(lengths[i] for i in rows))
    assert statistics.fmean(spreads) < 0.25 * (max(lengths) - min(lengths))


def test_lengths_must_match_the_rows():
    with pytest.raises(ValueError, match="lengths has 3 entries for 4 rows"):
        ResumableSampler(Rows(4), num_replicas=1, rank=0, shuffle=True, seed=0, lengths=[1, 2, 3])


def padding_fraction(loader) -> float:
    real = padded = 0
    for batch in loader:
        for side in ("chosen", "rejected"):
            mask = batch[f"{side}_attention_mask"]
            real += int(mask.sum())
            padded += mask.numel()
    return 1 - real / padded


def test_grouped_hh_batches_pad_less_and_resume_mid_epoch(real_hh_dir, tokenizer):
    """Measured on all 4,664 HH helpful + harmless test pairs (batch 8, 256 tokens): 44 % padding → 13 %."""
    settings = dict(limit_train=200, holdout=0, batch_size=8, max_length=256, max_prompt_length=128, shuffle=True)
    plain = hh_pairs(real_hh_dir, **settings).configure(tokenizer, mode="pair")
    grouped = hh_pairs(real_hh_dir, group_by_length=True, **settings).configure(tokenizer, mode="pair")
    plain.setup("fit")
    grouped.setup("fit")
    assert padding_fraction(grouped.train_dataloader()) < 0.5 * padding_fraction(plain.train_dataloader())
    data = grouped.dataset("train")
    rows = [data[i] for i in range(len(data))]
    assert data.lengths() == [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]

    # resume: a loader that consumed 7 batches of epoch 1 and a fresh one restored from its state yield the same rest
    loader = grouped.train_dataloader()
    loader.sampler.set_epoch(1)
    uninterrupted = [batch["index"].tolist() for batch in loader]
    iterator = iter(loader)
    for _ in range(7):
        next(iterator)
    state = loader.state_dict()
    restored = grouped.train_dataloader()
    restored.sampler.set_epoch(1)
    restored.load_state_dict(state)
    assert [batch["index"].tolist() for batch in restored] == uninterrupted[7:]
    assert sorted(i for batch in uninterrupted for i in batch) == list(range(200))


def loader_over(n: int, batch_size: int, lengths=None):
    from datamodules.sampling import ResumableDataLoader

    sampler = ResumableSampler(Rows(n), num_replicas=1, rank=0, shuffle=True, seed=7, lengths=lengths, batch_size=4)
    return ResumableDataLoader(Rows(n), sampler, batch_size=batch_size)


def test_a_resume_with_another_batch_size_skips_the_rows_already_trained_and_counts_the_rest(recwarn):
    first = loader_over(24, 4)
    iterator = iter(first)
    trained = [int(i) for _ in range(3) for i in next(iterator)]  # 3 batches: the first 12 rows of the order
    state = first.state_dict()
    order = [int(i) for batch in loader_over(24, 4) for i in batch]
    assert trained == order[:12]

    exact = loader_over(24, 6)  # 12 rows = 2 batches of 6: nothing twice, nothing skipped
    exact.load_state_dict(state)
    assert [int(i) for batch in exact for i in batch] == order[12:] and not recwarn.list

    rounded = loader_over(24, 5)  # 12 rows = 2 batches of 5 + 2 rows: those 2 are trained again, and said
    rounded.load_state_dict(state)
    with pytest.warns(UserWarning, match="global batch of 5 rows, not 4: 2 rows the checkpoint had trained on"):
        rest = [int(i) for batch in rounded for i in batch]
    assert rest == order[10:]
