"""Token and sequence log-probabilities: the one implementation every module uses.

* :func:`token_logprobs` — log π(label | context) from aligned logits, without a full log-softmax in fp32;
* :func:`sequence_logprobs` — forward a model on right-padded [prompt ; completion] rows and sum the completion
  tokens' log-probs (DPO, KTO, SFT, reward-free scoring);
* :func:`response_logprobs` — per-token log-probs of sampled responses after left-padded prompts (PPO, GRPO, DM).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(label | context) per position: ``log_softmax(logits)[label]`` without materialising the log-softmax.

    ``logits`` [..., V] and ``labels`` [...] must already be aligned (logits at t score the label at t).
    Full precision uses gather − logsumexp (one [..., V] temporary for the logsumexp instead of a second full
    log-softmax tensor). Half precision is upcast one row at a time, so float32 never holds the whole batch.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = [
        torch.log_softmax(row.float(), dim=-1).gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        for row, row_labels in zip(logits, labels, strict=True)
    ]
    return torch.stack(rows)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding, so left-padded rows (prompts, rollouts) get the positions generation used;
    on right-padded rows they equal ``arange`` over the real tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class SequenceLogps(NamedTuple):
    """Per-sequence sums over completion tokens, plus the per-token values they come from."""

    logps: Tensor  # [B] Σ_t log π(y_t | x, y_<t) over completion tokens
    tokens: Tensor  # [B] number of completion tokens
    token_logps: Tensor  # [B, L] for the last L tokens of input_ids (L covers every row's completion)
    mask: Tensor  # [B, L] completion mask aligned the same way


def sequence_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> SequenceLogps:
    """Forward ``model`` on right-padded sequences and sum the log-probs of the completion tokens.

    The output layer runs only from the earliest completion token of the batch onwards (``logits_to_keep``):
    with a 49k-token vocabulary the logits of prompt positions are a large share of a small model's compute and
    memory, and no loss needs them.
    """
    width = input_ids.shape[1]
    has_completion = completion_mask.any(-1)
    first = torch.where(
        has_completion, completion_mask.int().argmax(-1), torch.full_like(has_completion, width, dtype=torch.long)
    )
    start = int(first.min().clamp(1, width - 1)) if width > 1 else 1  # position 0 has no predicting logit
    keep = width - start + 1  # logits at positions start-1 … width-1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: compute all positions and slice
        logits = model(**inputs, use_cache=False).logits[:, -keep:]
    token_logps = token_logprobs(logits[:, :-1], input_ids[:, start:])
    mask = completion_mask[:, start:].to(token_logps.dtype)
    token_logps = token_logps * mask
    return SequenceLogps(token_logps.sum(-1), mask.sum(-1), token_logps, mask)


def response_logprobs(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_width: int,
    temperature: float = 1.0,
    output_hidden_states: bool = False,
):
    """Per-token log-probs [B, R] of the response tokens under ``model`` (logits / temperature, as sampled), the
    scaled logits, and the model output (for hidden states)."""
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )
    logits = out.logits[:, prompt_width - 1 : -1] / temperature
    return token_logprobs(logits, sequences[:, prompt_width:]), logits, out
