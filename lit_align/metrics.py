"""torchmetrics for alignment runs.

Every metric here keeps sums and counts as states reduced with ``sum``, so a value computed under DDP/FSDP equals
the value one process would compute on the union of the data (no mean-of-means). Names follow TRL where TRL has
one (``rewards/chosen``, ``rewards/margins``, ``logps/chosen``, ``kl``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric


class DifferenceOfMeans(Metric):
    """mean(a) − mean(b) over all updates and ranks; KTO's ``rewards/margins`` (groups of unequal size)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("sum_a", "count_a", "sum_b", "count_b"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, a: Tensor, b: Tensor) -> None:
        self.sum_a += a.detach().double().sum()
        self.count_a += a.numel()
        self.sum_b += b.detach().double().sum()
        self.count_b += b.numel()

    def compute(self) -> Tensor:
        if self.count_a == 0 or self.count_b == 0:
            return torch.tensor(float("nan"))
        return (self.sum_a / self.count_a - self.sum_b / self.count_b).float()


class Perplexity(Metric):
    """exp(total negative log-likelihood / total tokens), from per-token log-probs and a mask."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, token_logps: Tensor, mask: Tensor) -> None:
        mask = mask.to(token_logps.dtype)
        self.nll -= (token_logps.detach() * mask).double().sum()
        self.tokens += mask.double().sum()

    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.tokens).float()


class StageMetrics(nn.Module):
    """One exact running mean per metric name and stage (train / val / test), logged as metric objects.

    Lightning calls ``compute``/``reset`` for logged metric objects, so the epoch value is synced exactly across
    ranks. Separate instances per stage, as the torchmetrics Lightning guide requires.
    """

    PREFIXES = {"train": "", "val": "eval_", "test": "test_"}

    def __init__(self, names: Iterable[str], extra: dict[str, type[Metric]] | None = None) -> None:
        super().__init__()
        self.names = list(names)
        self.stages = nn.ModuleDict()
        for stage in self.PREFIXES:
            metrics = {self._key(name): MeanMetric() for name in self.names}
            for name, metric_class in (extra or {}).items():
                metrics[self._key(name)] = metric_class()
            self.stages[f"{stage}_metrics"] = nn.ModuleDict(metrics)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", "__")  # ModuleDict keys may not hold some characters used in TRL names

    def get(self, stage: str, name: str) -> Metric:
        return self.stages[f"{stage}_metrics"][self._key(name)]

    def log_name(self, stage: str, name: str) -> str:
        return self.PREFIXES[stage] + name

    def updated(self, stage: str) -> dict[str, Metric]:
        """The stage's metrics that have seen data since their last reset, by logged name."""
        return {
            self.log_name(stage, key.replace("__", "/")): metric
            for key, metric in self.stages[f"{stage}_metrics"].items()
            if metric.update_called
        }


_WORDS = re.compile(r"\w+|[^\w\s]")


def distinct_n(text: str, n: int) -> float:
    """Distinct-n of one text: unique n-grams / tokens (Li et al. 2016; GDC's per-text variant), words and
    punctuation as tokens; 0 for an empty text."""
    tokens = _WORDS.findall(text.lower())
    if not tokens:
        return 0.0
    grams = {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
    return len(grams) / len(tokens)


def self_bleu_scores(texts: list[str], max_order: int) -> list[float]:
    """Each text's sentence BLEU (sacrebleu, up to ``max_order``-grams, 'exp' smoothing, in [0, 1]) against all the
    other texts; empty with fewer than two texts."""
    from sacrebleu.metrics import BLEU

    if len(texts) < 2:
        return []
    bleu = BLEU(max_ngram_order=max_order, effective_order=True)
    return [bleu.sentence_score(text, texts[:i] + texts[i + 1 :]).score / 100 for i, text in enumerate(texts)]


def self_bleu(texts: list[str], max_order: int) -> float:
    """Self-BLEU-n (Zhu et al. 2018, Texygen): the mean of :func:`self_bleu_scores`; 0 with fewer than two texts."""
    scores = self_bleu_scores(texts, max_order)
    return sum(scores) / len(scores) if scores else 0.0


DIVERSITY_NAMES = ("distinct_1", "distinct_2", "distinct_3", "self_bleu_3", "self_bleu_4", "self_bleu_5")


def diversity_scores(texts: list[str]) -> dict[str, float]:
    """Distinct-1/2/3 (mean over texts) and Self-BLEU-3/4/5 (over this set of texts)."""
    scores = {f"distinct_{n}": sum(distinct_n(t, n) for t in texts) / max(len(texts), 1) for n in (1, 2, 3)}
    scores.update({f"self_bleu_{n}": self_bleu(texts, n) for n in (3, 4, 5)})
    return scores
