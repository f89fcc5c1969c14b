"""Sampling from a causal LM and the masks and texts of what was sampled (shared by PPO, GRPO and distribution
matching). Sharding concerns (synced forward calls, gathered weights) are handled by
``AlignmentModule.generate_responses``, which calls :func:`sample_responses`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import GenerationConfig


@dataclass(frozen=True)
class SamplingSettings:
    """How a module samples its responses (``transformers.GenerationConfig`` fields; generation stops at EOS).

    Pure ancestral sampling (temperature 1, no top-k / top-p) is the default: log-probs are then those of the
    distribution the samples come from, which PPO's ratios and distribution matching's importance weights assume.
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

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


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    tokenizer,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingSettings,
    synced_gpus: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample responses to left-padded prompts; returns (sequences, attention mask, response mask up to and
    including the first EOS). ``synced_gpus`` keeps FSDP ranks in lockstep until every rank is done."""
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        use_cache=True,
    )
    sequences = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, synced_gpus=synced_gpus
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
