"""Sampling from a causal LM and the masks and texts of what was sampled (shared by PPO, GRPO and distribution
matching). Sharding concerns (synced forward calls, gathered weights) are handled by
``AlignmentModule.generate_responses``, which calls :func:`sample_responses`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingSettings:
    """How a module samples its responses (``transformers.GenerationConfig`` fields; generation stops at EOS).

    Pure ancestral sampling (temperature 1, no top-k / top-p) is the default: log-probs are then those of the
    distribution the samples come from, which PPO's ratios and distribution matching's importance weights assume.
    ``cache_implementation`` is passed to ``generate``: ``"static"`` pre-allocates the KV cache, and on CUDA
    transformers then compiles the decoding step. On a CPU it does not pay (``benchmarks/README.md``), so the
    default (None) is transformers' dynamic cache.
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cache_implementation: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cache_implementation not in (None, "dynamic", "static"):
            problems.append(
                f"cache_implementation must be null, 'dynamic' or 'static', got {self.cache_implementation!r}"
            )
        if problems:
            raise ValueError("sampling: " + "; ".join(problems))

    @classmethod
    def of(cls, value: SamplingSettings | dict) -> SamplingSettings:
        """``value`` as settings; a dict of fields (from Python) is checked for unknown names."""
        if isinstance(value, cls):
            return value
        valid = [f.name for f in fields(cls)]
        if unknown := sorted(set(value) - set(valid)):
            raise ValueError(f"sampling: unknown settings {unknown}; valid: {valid}")
        return cls(**value)

    def as_dict(self) -> dict:
        return asdict(self)


# Lightning checkpoints keep hyperparameters, and torch.load(weights_only=True) (the default) refuses unknown classes
torch.serialization.add_safe_globals([SamplingSettings])


class InverseCDFSampler(LogitsProcessor):
    """Draws each next token by inverse-CDF sampling and hands ``generate`` logits that put all mass on it, so
    greedy decoding emits exactly the draw.

    The distribution is ``generate``'s own sampling distribution: its processors (e.g. ``min_new_tokens``) run
    first, then temperature, top-k and top-p (transformers' warpers, in transformers' order). One uniform number
    per row replaces ``torch.multinomial``, which draws an exponential variate for every vocabulary entry: on a CPU
    that was 16 % of a rollout's generation time with the 49k-token vocabulary of SmolLM2 (``benchmarks/README.md``).
    """

    def __init__(self, sampling: SamplingSettings) -> None:
        warpers = []
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = self.warpers(input_ids, scores.float())
        cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)
        # u in (0, total]: the first index whose cumulative mass reaches u has non-zero probability
        u = (1.0 - torch.rand(scores.shape[0], 1, dtype=cdf.dtype, device=cdf.device)) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u).clamp_max(scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    tokenizer,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingSettings,
    synced_gpus: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample responses to left-padded prompts (:class:`InverseCDFSampler`); returns (sequences, attention mask,
    response mask up to and including the first EOS). ``synced_gpus`` keeps FSDP ranks in lockstep until every rank
    is done."""
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=False,  # the draw is InverseCDFSampler's; greedy decoding takes it
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        use_cache=True,
        cache_implementation=sampling.cache_implementation,
    )
    sequences = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=config,
        logits_processor=LogitsProcessorList([InverseCDFSampler(sampling)]),
        synced_gpus=synced_gpus,
    )
    responses = sequences[:, prompt_ids.shape[1] :]
    response_mask = responses_until_eos(responses, eos)
    return sequences, torch.cat([prompt_mask, response_mask], dim=1), response_mask


def responses_until_eos(responses: Tensor, eos_token_id: int) -> Tensor:
    """1 for every response token up to and including the first EOS (all tokens when there is none)."""
    is_eos = responses == eos_token_id
    positions = torch.arange(responses.shape[1], device=responses.device)
    first_eos = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), responses.shape[1] - 1)
    return (positions[None, :] <= first_eos[:, None]).long()


def decode_responses(
    tokenizer, sequences: Tensor, prompt_width: int, response_mask: Tensor
) -> tuple[list[str], list[str]]:
    """The prompt as the model saw it (after truncation, padding removed) and the response up to EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = tokenizer.batch_decode(sequences[:, :prompt_width], skip_special_tokens=True)
    responses = sequences[:, prompt_width:].masked_fill(response_mask == 0, pad)
    return prompts, tokenizer.batch_decode(responses, skip_special_tokens=True)


def ends_with_eos(responses: Tensor, response_mask: Tensor, eos_token_id: int) -> Tensor:
    """[N] bool: the response stopped at an EOS (else generation cut it at ``max_new_tokens``)."""
    return (responses == eos_token_id).logical_and(response_mask.bool()).any(-1)


def repeat_rows(value, k: int):
    """Repeat each row k times (tensors along dim 0, lists element-wise), matching ``repeat_interleave``."""
    if torch.is_tensor(value):
        return value.repeat_interleave(k, dim=0)
    if isinstance(value, list):
        return [item for item in value for _ in range(k)]
    return value


class Completions(NamedTuple):
    """Sampled completions of a batch of prompts, k per prompt, grouped by prompt (``[p0s0, p0s1, …, p1s0, …]``):
    what :meth:`~lit_align.rollout.RolloutMechanics.sample_completions` returns to PPO's and GRPO's rollout and
    evaluation."""

    sequences: Tensor  # [N, P + R] the left-padded prompt followed by the response
    attention_mask: Tensor  # [N, P + R]
    response_mask: Tensor  # [N, R] 1 up to and including the first EOS
    prompt_width: int  # P
    prompts: list[str]  # as the model saw them (after truncation, padding removed)
    completions: list[str]  # the responses up to EOS
    has_eos: Tensor  # [N] bool: the response ended with EOS
    batch: dict  # the prompt batch's columns, each row repeated k times (for rewards that read them)

    def penalise_missing_eos(self, scores: Tensor, penalty: float | None) -> Tensor:
        """``scores − penalty`` for the completions without EOS (TRL's ``missing_eos_penalty``); unchanged for None."""
        if penalty is None:
            return scores
        return scores - penalty * (~self.has_eos).to(scores.dtype)
