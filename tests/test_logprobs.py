"""The shared log-prob function against a naive log_softmax + gather, and sequence sums over completion masks."""

import torch

from lit_align.logprobs import sequence_logprobs, token_logprobs
from lit_align.models import tiny_llama


def naive(logits, labels):
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_token_logprobs_matches_naive_full_precision():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 4
    labels = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(token_logprobs(logits, labels).double(), naive(logits, labels), atol=1e-5, rtol=0)


def test_token_logprobs_half_precision_is_upcast_per_row():
    torch.manual_seed(1)
    logits = (torch.randn(2, 5, 40) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 40, (2, 5))
    got = token_logprobs(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive(logits.float(), labels), atol=1e-5, rtol=0)


def test_token_logprobs_temperature_divides_logits():
    logits = torch.tensor([[[2.0, 0.0, -2.0]]])
    labels = torch.tensor([[0]])
    # by hand: softmax([1, 0, -1])[0] = e / (e + 1 + 1/e)
    e = torch.e
    expected = torch.log(torch.tensor(e / (e + 1 + 1 / e)))
    torch.testing.assert_close(token_logprobs(logits, labels, temperature=2.0)[0, 0], expected)


def test_sequence_logprobs_sums_only_completion_tokens():
    model = tiny_llama(seed=3, vocab_size=64).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 2], [10, 11, 12, 2, 2, 2]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    out = sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_token = naive(logits[:, :-1], input_ids[:, 1:])
    # row 0: tokens at positions 3, 4, 5 are scored by logits at 2, 3, 4; row 1: positions 1..3 by 0..2
    expected = torch.stack([per_token[0, 2:5].sum(), per_token[1, 0:3].sum()])
    torch.testing.assert_close(out.logps.double(), expected, atol=1e-5, rtol=0)
    assert out.tokens.tolist() == [3.0, 3.0]


def test_sequence_logprobs_skips_prompt_logits_without_changing_the_result():
    model = tiny_llama(seed=4, vocab_size=64).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 2], [11, 12, 13, 14, 15, 2, 2]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    completion_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0]])  # earliest completion: 3
    out = sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_token = naive(logits[:, :-1], input_ids[:, 1:])
    expected = torch.stack([per_token[0, 3:6].sum(), per_token[1, 2:5].sum()])
    torch.testing.assert_close(out.logps.double(), expected, atol=1e-5, rtol=0)
    assert out.token_logps.shape == (2, 4)  # positions 3..6 only: the prompt's logits were never computed
