"""Target distributions for distribution matching: energy-based models over texts built on the original LM a.

    pointwise       P(x) = a(x)·Π_i b_i(x),          b_i ∈ {0, 1}      (Khalifa et al. 2021, GDC §2.1)
    distributional  P(x) = a(x)·exp(λ·φ(x)),         E_p[φ] = μ̄       (GDC Eq. 1–2, the information projection)
    hybrid          P(x) = a(x)·Π_i b_i(x)·exp(λ·φ(x))
    KL-control      P(x) = a(x)·exp(r(x)/β)                            (Korbak et al. 2022, Theorem 1)

p = P/Z. A target gives ``feature_values`` (one column per feature, for metrics) and ``log_score`` = log P − log a
from those values, so features run once per sample. Features are plain callables on the completion text
(``str -> float``); a reward from ``lit_align.rewards`` can be one through ``RewardFeature``.

λ is fitted by self-normalised importance sampling (``fit_lambdas``): with samples x_i ~ q and weights
w_i = a(x_i)·b(x_i)·exp(λ·φ(x_i))/q(x_i), μ̂(λ) = Σ w_i φ(x_i)/Σ w_i, and λ ← λ + lr·(μ̄ − μ̂(λ)) — gradient descent
on the convex dual log Z(λ) − λ·μ̄ (the GDC code's ``compute_optimal_lambdas``).

The divergence estimators below use samples from a proposal q (Korbak et al. 2022 §3; the GDC code's
``base_trainer.py``): KL(p‖π) ≈ −log Ẑ + (1/Ẑ)·mean_q[(P/q)(log P − log π)] and TVD(p, π) ≈ ½·mean_q|π/q − P/(Ẑq)|.
They take log Ẑ and form P/(Ẑq) in log space: for a KL-control target a·exp(r/β) with small β, P/q itself exceeds
float64 (log P − log q > 709). ``effective_sample_size`` is Kish's ESS of the importance weights, the check that an
estimate rests on more than a handful of samples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

Feature = Callable[[str], float]


# ---- features ---------------------------------------------------------------------------------------------------


class WordFeature:
    """1 if the text contains ``word`` as a whole word (case-insensitive by default), else 0."""

    def __init__(self, word: str, case_sensitive: bool = False) -> None:
        self.word = word
        self.pattern = re.compile(rf"\b{re.escape(word)}\b", 0 if case_sensitive else re.IGNORECASE)

    def __call__(self, text: str) -> float:
        return float(self.pattern.search(text) is not None)


class WordListFeature:
    """1 if the text contains any word of the list (a topic constraint, as PPLM's word lists), else 0."""

    def __init__(self, words: Sequence[str], case_sensitive: bool = False) -> None:
        if not words:
            raise ValueError("WordListFeature needs at least one word")
        alternatives = "|".join(re.escape(w) for w in words)
        self.pattern = re.compile(rf"\b(?:{alternatives})\b", 0 if case_sensitive else re.IGNORECASE)

    def __call__(self, text: str) -> float:
        return float(self.pattern.search(text) is not None)


class RegexFeature:
    """1 if the regular expression matches somewhere in the text, else 0."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern = re.compile(pattern, flags)

    def __call__(self, text: str) -> float:
        return float(self.pattern.search(text) is not None)


class FemalePronounFeature:
    """1 if the text has more female (she, her, hers, herself) than male (he, him, his, himself) pronouns — the
    GDC code's gender feature for biographies."""

    FEMALE = re.compile(r"\b(?:she|her|hers|herself)\b", re.IGNORECASE)
    MALE = re.compile(r"\b(?:he|him|his|himself)\b", re.IGNORECASE)

    def __call__(self, text: str) -> float:
        return float(len(self.FEMALE.findall(text)) > len(self.MALE.findall(text)))


class RewardFeature:
    """A reward function (``lit_align.rewards``) as a feature: its score, or 1/0 for score > ``threshold``."""

    def __init__(self, reward: nn.Module, threshold: float | None = None) -> None:
        self.reward, self.threshold = reward, threshold

    def __call__(self, text: str) -> float:
        score = float(self.reward([""], [text], {})[0])
        return score if self.threshold is None else float(score > self.threshold)


# ---- targets ----------------------------------------------------------------------------------------------------


class TargetEBM(nn.Module):
    """P(x) = a(x)·exp(log_score(x)); subclasses define the features and the score."""

    def __init__(self, features: dict[str, Feature]) -> None:
        super().__init__()
        if not features:
            raise ValueError(f"{type(self).__name__} needs at least one feature")
        self.features = dict(features)

    @property
    def feature_names(self) -> list[str]:
        return list(self.features)

    def feature_values(self, completions: Sequence[str]) -> Tensor:
        """φ(x) for every completion: [N, F] float64 (features are evaluated on the completion text)."""
        rows = []
        for index, text in enumerate(completions):
            row = []
            for name, feature in self.features.items():
                value = float(feature(text))
                if not math.isfinite(value):
                    raise ValueError(f"feature '{name}' returned {value} on completion {index}: {text[:80]!r}")
                row.append(value)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float64).reshape(len(completions), len(self.features))

    def log_score(self, values: Tensor) -> Tensor:
        """log P(x) − log a(x) from the feature values [N, F]; −inf where P(x) = 0."""
        raise NotImplementedError

    @property
    def needs_fit(self) -> bool:
        return False


def _pointwise_log_score(values: Tensor) -> Tensor:
    if ((values != 0) & (values != 1)).any():
        raise ValueError("pointwise constraints need binary features (0 or 1)")
    return torch.log(values).sum(-1)  # log 1 = 0, log 0 = −inf


class PointwiseConstraint(TargetEBM):
    """P(x) = a(x)·Π_i b_i(x): every binary feature must hold (moment 1); no λ to fit."""

    def log_score(self, values: Tensor) -> Tensor:
        return _pointwise_log_score(values)


class DistributionalConstraint(TargetEBM):
    """P(x) = a(x)·exp(λ·φ(x)) with λ fitted so that E_p[φ] = ``moments`` (μ̄), and optional pointwise features
    ``required`` that must hold (a hybrid constraint: P = a·b·exp(λ·φ)).

    Args:
        features: the distributional features φ.
        moments: μ̄, one per feature.
        required: binary features b that must hold (hybrid); their columns come after φ's.
        lr, tolerance, max_iterations: the SNIS moment-matching loop (GDC code: 0.5, 0.01 in L2, 1000).
    """

    def __init__(
        self,
        features: dict[str, Feature],
        moments: Sequence[float],
        required: dict[str, Feature] | None = None,
        lr: float = 0.5,
        tolerance: float = 1e-2,
        max_iterations: int = 1000,
    ) -> None:
        if len(moments) != len(features):
            raise ValueError(f"{len(moments)} moments for {len(features)} features")
        overlap = set(features) & set(required or {})
        if overlap:
            raise ValueError(f"feature names used twice: {sorted(overlap)}")
        super().__init__({**features, **(required or {})})
        self.num_distributional = len(features)
        self.register_buffer("moments", torch.tensor(list(moments), dtype=torch.float64))
        self.register_buffer("lambdas", torch.zeros(len(features), dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(False))
        self.lr, self.tolerance, self.max_iterations = lr, tolerance, max_iterations

    @property
    def needs_fit(self) -> bool:
        return not bool(self.fitted)

    def log_score(self, values: Tensor) -> Tensor:
        phi, required = values[:, : self.num_distributional], values[:, self.num_distributional :]
        score = phi.to(self.lambdas) @ self.lambdas
        if required.shape[1]:
            score = score + _pointwise_log_score(required).to(score)
        return score

    def fit(self, values: Tensor, log_a_over_q: Tensor) -> LambdaFit:
        """Fit λ on samples x_i ~ q with feature values [N, F] and log a(x_i) − log q(x_i) (0 when q = a)."""
        phi, required = values[:, : self.num_distributional], values[:, self.num_distributional :]
        log_base = log_a_over_q.double() + (_pointwise_log_score(required) if required.shape[1] else 0.0)
        result = fit_lambdas(phi, self.moments, log_base, self.lr, self.tolerance, self.max_iterations)
        self.lambdas.copy_(result.lambdas)
        self.fitted.fill_(True)
        message = (
            f"DistributionalConstraint: λ = {result.lambdas.tolist()} after {result.iterations} iterations; "
            f"SNIS moments {result.moments.tolist()} vs target {self.moments.tolist()} (error {result.error:.3g})"
        )
        if result.converged:
            rank_zero_info(message)
        else:
            rank_zero_warn(message + f": not within tolerance {self.tolerance}; use more samples or iterations")
        return result


class KLControlTarget(TargetEBM):
    """P(x) = a(x)·exp(r(x)/β): the optimum of KL-regularised RL, E_π[r] − β·KL(π‖a) (Korbak et al. 2022, Thm 1)."""

    def __init__(self, reward: nn.Module, beta: float) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        super().__init__({"reward": RewardFeature(reward)})
        self.beta = beta

    def log_score(self, values: Tensor) -> Tensor:
        return values[:, 0] / self.beta


# ---- λ fitting and divergence estimates ---------------------------------------------------------------------------


class LambdaFit(NamedTuple):
    lambdas: Tensor
    moments: Tensor  # the SNIS moments at the returned λ
    error: float  # ‖μ̄ − μ̂‖₂
    iterations: int
    converged: bool


def snis_moments(phi: Tensor, log_weights: Tensor) -> Tensor:
    """Σ w_i φ_i / Σ w_i with w = exp(log_weights), computed stably."""
    weights = torch.softmax(log_weights.double(), dim=0)
    return weights @ phi.double()


def fit_lambdas(
    phi: Tensor,
    moments: Tensor,
    log_base_weights: Tensor,
    lr: float = 0.5,
    tolerance: float = 1e-2,
    max_iterations: int = 1000,
) -> LambdaFit:
    """λ with SNIS moments E[φ] ≈ μ̄: iterate λ ← λ + lr·(μ̄ − μ̂(λ)), weights log w = log_base + λ·φ, from λ = 0.

    ``log_base_weights`` = log a(x) + log b(x) − log q(x) of each sample (0 for samples from a).
    """
    phi, moments = phi.double(), moments.double().to(phi.device)
    log_base = log_base_weights.double().to(phi.device)
    if not torch.isfinite(log_base).any():
        raise ValueError("no sample has non-zero weight under the target (every pointwise constraint failed)")
    supported = phi[torch.isfinite(log_base)]
    for index in range(phi.shape[1]):
        low, high, target = float(supported[:, index].min()), float(supported[:, index].max()), float(moments[index])
        if not low <= target <= high:
            raise ValueError(
                f"feature {index}: target moment {target} is outside the sampled values' range [{low}, {high}]; "
                "λ would diverge: draw more samples (or is the feature ever true?)"
            )
    lambdas = torch.zeros(phi.shape[1], dtype=torch.float64, device=phi.device)
    estimate = snis_moments(phi, log_base)
    iterations = 0
    while iterations < max_iterations and float(torch.linalg.vector_norm(moments - estimate)) >= tolerance:
        lambdas = lambdas + lr * (moments - estimate)
        estimate = snis_moments(phi, log_base + phi @ lambdas)
        iterations += 1
    error = float(torch.linalg.vector_norm(moments - estimate))
    return LambdaFit(lambdas, estimate, error, iterations, error < tolerance)


def _normalized_weights(log_p_unnormalized: Tensor, log_q: Tensor, log_z: Tensor | float) -> Tensor:
    """P/(Ẑ·q) in float64, formed in log space (no overflow however far P is from q); 0 where P(x) = 0."""
    log_z = torch.as_tensor(log_z, dtype=torch.float64, device=log_q.device)
    return torch.exp(log_p_unnormalized.double() - log_q.double() - log_z)


def importance_kl(log_p_unnormalized: Tensor, log_q: Tensor, log_model: Tensor, log_z: Tensor | float) -> Tensor:
    """KL(p‖model) ≈ −log Ẑ + mean_q[(P/(Ẑq))·(log P − log model)]; samples with P = 0 contribute 0.

    The GDC code's −log Ẑ + (1/Ẑ)·mean_q[(P/q)(log P − log model)], with Ẑ inside the exponent (``log_z`` = log Ẑ)
    so that P/q never has to be represented.
    """
    weights = _normalized_weights(log_p_unnormalized, log_q, log_z)
    gap = torch.where(weights > 0, log_p_unnormalized.double() - log_model.double(), torch.zeros_like(weights))
    return -torch.as_tensor(log_z, dtype=torch.float64, device=weights.device) + (weights * gap).mean()


def importance_tvd(log_p_unnormalized: Tensor, log_q: Tensor, log_model: Tensor, log_z: Tensor | float) -> Tensor:
    """TVD(p, model) ≈ ½·mean_q|model/q − P/(Ẑ·q)| (``log_z`` = log Ẑ)."""
    weights = _normalized_weights(log_p_unnormalized, log_q, log_z)
    model_over_q = torch.exp(log_model.double() - log_q.double())
    return 0.5 * (model_over_q - weights).abs().mean()


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """Kish's effective sample size (Σw)²/Σw² of importance weights w = exp(``log_weights``), in log space
    (any scale of w; w = 0 where the log weight is −inf); 0 when every weight is 0.

    It counts how many equally weighted samples a self-normalised estimate is worth: 1 when one sample carries all
    the weight, n for n equal weights. ESS ≤ 1/max(w/Σw)², so ESS ≥ k means no sample carries more than 1/√k of
    the weight."""
    log_weights = log_weights.double().flatten()
    log_sum = torch.logsumexp(log_weights, 0)
    if bool(torch.isneginf(log_sum)):
        return torch.zeros((), dtype=torch.float64, device=log_weights.device)
    return torch.exp(2 * log_sum - torch.logsumexp(2 * log_weights, 0))
