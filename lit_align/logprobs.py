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


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder trunk and the plain linear output layer of a Hugging Face causal LM (through a PEFT wrapper),
    or ``None`` when the chunked head cannot stand in for ``model``'s own logits: no ``get_decoder``, an output
    layer that is not a plain ``nn.Linear`` (e.g. LoRA on it), logit soft-capping or scaling, or sharded (FSDP2
    DTensor) parameters, which only the model's own forward unshards."""
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    head = get_head()
    if type(head) is not nn.Linear or any(type(p) is not nn.Parameter for p in head.parameters()):
        return None
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        return None
    return get_decoder(), head


def sequence_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, chunk_size: int | None = None
) -> SequenceLogps:
    """Forward ``model`` on right-padded sequences and sum the log-probs of the completion tokens.

    The output layer runs only from the earliest completion token of the batch onwards (``logits_to_keep``):
    with a 49k-token vocabulary the logits of prompt positions are a large share of a small model's compute and
    memory, and no loss needs them. With ``chunk_size`` the output layer and the log-prob run ``chunk_size``
    positions at a time (``chunked_token_logprobs``: no [B, T, V] logits) where ``trunk_and_head`` allows.
    """
    width = input_ids.shape[1]
    has_completion = completion_mask.any(-1)
    first = torch.where(
        has_completion, completion_mask.int().argmax(-1), torch.full_like(has_completion, width, dtype=torch.long)
    )
    start = int(first.min().clamp(1, width - 1)) if width > 1 else 1  # position 0 has no predicting logit
    keep = width - start + 1  # logits at positions start-1 … width-1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    parts = trunk_and_head(model) if chunk_size else None
    if parts is not None:
        hidden = parts[0](**inputs, use_cache=False).last_hidden_state[:, start - 1 : -1]
        token_logps = chunked_token_logprobs(hidden, parts[1], input_ids[:, start:], chunk_size)
    else:
        try:
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep: compute all positions and slice
            logits = model(**inputs, use_cache=False).logits[:, -keep:]
        token_logps = token_logprobs(logits[:, :-1], input_ids[:, start:])
    mask = completion_mask[:, start:].to(token_logps.dtype)
    token_logps = token_logps * mask
    return SequenceLogps(token_logps.sum(-1), mask.sum(-1), token_logps, mask)


class ResponseLogps(NamedTuple):
    """Per-token values of sampled responses (the ``R`` positions after the prompt)."""

    logps: Tensor  # [B, R] log π(y_t | x, y_<t) of logits / temperature
    entropy: Tensor | None  # [B, R] entropy of softmax(logits / temperature), no gradient; with_entropy only
    hidden: Tensor | None  # [B, T, H] the last hidden states of every position; output_hidden only


def response_logprobs(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_width: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    output_hidden: bool = False,
    chunk_size: int | None = None,
) -> ResponseLogps:
    """Per-token log-probs of the response tokens after left-padded prompts (logits / temperature, as sampled),
    optionally their entropies and the last hidden states. With ``chunk_size`` the output layer runs that many
    positions at a time (``chunked_token_logprobs``: no [B, R, V] logits) where ``trunk_and_head`` allows."""
    inputs = dict(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    labels = sequences[:, prompt_width:]
    parts = trunk_and_head(model) if chunk_size else None
    if parts is not None:
        out = parts[0](**inputs, output_hidden_states=output_hidden, use_cache=False)
        states = out.last_hidden_state[:, prompt_width - 1 : -1]
        if with_entropy:
            logps, entropy = chunked_token_logprobs_and_entropy(states, parts[1], labels, chunk_size, temperature)
        else:
            logps, entropy = chunked_token_logprobs(states, parts[1], labels, chunk_size, temperature), None
    else:
        out = model(**inputs, output_hidden_states=output_hidden, use_cache=False)
        logits = out.logits[:, prompt_width - 1 : -1] / temperature
        logps = token_logprobs(logits, labels)
        entropy = token_entropy(logits.detach()) if with_entropy else None
    return ResponseLogps(logps, entropy, out.hidden_states[-1] if output_hidden else None)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy ``[..., ]`` of the distributions ``softmax(logits)`` over the last axis (a row at a time, in
    float32)."""
    rows = (row.float() for row in logits)
    return torch.stack([torch.logsumexp(row, -1) - (torch.softmax(row, -1) * row).sum(-1) for row in rows])


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weightᵀ + bias)[label] a chunk of rows at a time; backward recomputes each chunk's
    logits, so no [N, V] tensor outlives its chunk (the idea of fused linear cross-entropy, Wijmans et al. 2024,
    "Cut Your Losses in Large-Vocabulary Language Models")."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        chunk: int,
        temperature: float,
        with_entropy: bool,
    ):
        # under autocast the matmuls run in its dtype, forward and recomputation alike (backward runs outside the
        # autocast region, so the dtype is fixed here and the products are cast explicitly)
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(out) if with_entropy else None
        with torch.autocast(device, enabled=False):
            head = _cast_head(weight, bias, compute)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = _chunk_logits(hidden[rows], *head, temperature)
                normalizer = torch.logsumexp(logits, -1)
                out[rows] = logits.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1) - normalizer
                if with_entropy:
                    entropy[rows] = normalizer - (torch.softmax(logits, -1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk, ctx.temperature, ctx.compute = chunk, temperature, compute
        if entropy is None:
            return out
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, *grad_entropy: Tensor):  # the entropy is not differentiated
        hidden, weight, bias, labels = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        head = _cast_head(weight, bias, ctx.compute)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits = _chunk_logits(hidden[rows], *head, ctx.temperature)
            # d/dlogits of (logit[label] - logsumexp) = onehot(label) - softmax, times the incoming gradient
            grad_logits = torch.softmax(logits, -1).mul_(-grad_out[rows].unsqueeze(-1))
            grad_logits.scatter_add_(-1, labels[rows].unsqueeze(-1), grad_out[rows].unsqueeze(-1))
            grad_logits.div_(ctx.temperature)
            low = grad_logits.to(ctx.compute)
            if need_hidden:
                grad_hidden[rows] = (low @ head[0]).to(hidden.dtype)
            if need_weight:  # accumulated over chunks in float32
                grad_weight.add_(low.t() @ hidden[rows].to(ctx.compute))
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _cast_head(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    return logits / temperature if temperature != 1.0 else logits


def chunked_token_logprobs(
    hidden: Tensor, head: nn.Linear, labels: Tensor, chunk_size: int = 1024, temperature: float = 1.0
) -> Tensor:
    """log π(label | context) from the last hidden states [..., H] and the output layer ``head``, ``chunk_size``
    positions at a time, in float32: peak memory grows with ``chunk_size × V``, not with the number of positions.
    Equal to ``token_logprobs(head(hidden) / temperature, labels)`` (values and gradients); the backward recomputes
    each chunk."""
    return _chunked(hidden, head, labels, chunk_size, temperature, with_entropy=False)


def chunked_token_logprobs_and_entropy(
    hidden: Tensor, head: nn.Linear, labels: Tensor, chunk_size: int = 1024, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``chunked_token_logprobs`` and, from the same chunks, the entropy of each position's distribution (without
    gradient: it is logged, not trained on)."""
    return _chunked(hidden, head, labels, chunk_size, temperature, with_entropy=True)


def _chunked(hidden: Tensor, head: nn.Linear, labels: Tensor, chunk_size: int, temperature: float, with_entropy: bool):
    shape = labels.shape
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    out = _ChunkedLinearLogprobs.apply(
        flat_hidden, head.weight, head.bias, flat_labels, chunk_size, temperature, with_entropy
    )
    if with_entropy:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)
