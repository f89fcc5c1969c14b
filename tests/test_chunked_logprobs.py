"""The chunked output layer + log-prob (``logprobs.chunked_token_logprobs``, issue 16): equal to the plain
``head(hidden)`` → ``token_logprobs`` path in values and gradients (fp32, 1e-5), and its autograd graph keeps no
[positions, vocabulary] tensor."""

from __future__ import annotations

import pytest
import torch

from lit_align.logprobs import chunked_token_logprobs


def reference_logprobs(hidden, head, labels, temperature):
    """Independent: full logits, float64 log-softmax, gather."""
    logits = head(hidden).double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_unchunked_head(chunk, bias, temperature):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    upstream = torch.randn(2, 7)

    ours = chunked_token_logprobs(hidden, head, labels, chunk_size=chunk, temperature=temperature)
    (ours * upstream).sum().backward()
    got = [hidden.grad.clone(), head.weight.grad.clone(), *([head.bias.grad.clone()] if bias else [])]
    hidden.grad = None
    head.zero_grad(set_to_none=True)

    expected = reference_logprobs(hidden, head, labels, temperature)
    (expected * upstream.double()).sum().backward()
    want = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]
    assert ours.dtype == torch.float32 and ours.shape == (2, 7)
    torch.testing.assert_close(ours.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8, requires_grad=True)
    chunked_token_logprobs(hidden, head, torch.randint(0, 30, (5,)), chunk_size=2).sum().backward()
    assert head.weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_the_graph_saves_no_positions_by_vocabulary_tensor():
    """What autograd keeps for backward: the plain path saves the [N, V] logits; the chunked one only its inputs."""
    torch.manual_seed(2)
    positions, vocabulary = 64, 1000
    head = torch.nn.Linear(16, vocabulary)
    hidden = torch.randn(positions, 16, requires_grad=True)
    labels = torch.randint(0, vocabulary, (positions,))

    def largest_saved(compute) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            compute()
        return max(sizes)

    plain = largest_saved(lambda: torch.log_softmax(head(hidden), -1).gather(-1, labels[:, None]))
    chunked = largest_saved(lambda: chunked_token_logprobs(hidden, head, labels, chunk_size=8))
    assert plain >= positions * vocabulary
    assert chunked == vocabulary * 16  # the weight itself: the largest thing kept
