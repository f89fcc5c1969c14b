"""The chunked output layer + log-prob (``logprobs.chunked_token_logprobs``, issue 16): equal to the plain
``head(hidden)`` → ``token_logprobs`` path in values and gradients (fp32, 1e-5), and its autograd graph keeps no
[positions, vocabulary] tensor."""

from __future__ import annotations

import pytest
import torch

from lit_align.logprobs import (
    chunked_token_logprobs,
    chunked_token_logprobs_and_entropy,
    response_logprobs,
    trunk_and_head,
)


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


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_dpo_step_with_the_chunked_head_equals_the_plain_one(lora, hh_dir):
    """Same batch, same weights: the DPO loss and every gradient agree with and without ``logprob_chunk_size``
    (tiny-llama's tied 49k-vocabulary head; under LoRA the reference is the policy with adapters disabled)."""
    from helpers import hh_pairs

    from lit_align import DPOModule
    from lit_align.models import LoraSettings

    results = []
    for chunk in (None, 7):
        settings = {"lora": LoraSettings(r=4, target_modules="all-linear")} if lora else {}
        module = DPOModule(model="tiny-llama", logprob_chunk_size=chunk, **settings)
        torch.manual_seed(0)  # the same LoRA A matrices in both runs
        module.configure_model()
        assert trunk_and_head(module.policy) is not None  # the chunked path runs, no fallback
        module.log = lambda *args, **kwargs: None  # outside a Trainer
        data = hh_pairs(hh_dir, limit_train=4, max_length=64, max_prompt_length=40).attach(module.tokenizer, "pair")
        data.setup("fit")
        batch = next(iter(data.dataloader("train")))
        loss = module.shared_step(batch, "train")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        message = lambda m, name=name: f"{name}: {m}"  # noqa: E731
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4, msg=message)


def test_the_chunk_size_must_be_positive():
    from lit_align import DPOModule

    with pytest.raises(ValueError, match="logprob_chunk_size must be >= 1"):
        DPOModule(model="tiny-llama", logprob_chunk_size=0)


def test_the_entropy_from_the_chunks_equals_the_full_softmax_entropy():
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 40)
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    labels = torch.randint(0, 40, (3, 5))
    logps, entropy = chunked_token_logprobs_and_entropy(hidden, head, labels, chunk_size=4, temperature=0.8)
    logits = head(hidden).double() / 0.8
    expected = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(entropy.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad and logps.requires_grad
    torch.testing.assert_close(logps, chunked_token_logprobs(hidden, head, labels, chunk_size=4, temperature=0.8))


def test_response_logprobs_chunked_equal_the_plain_forward_with_left_padded_prompts():
    """PPO/GRPO/DM's per-token response log-probs, entropies, last hidden states and gradients, with and without
    ``chunk_size``, on tiny-llama rows whose prompts are left-padded (as generation leaves them)."""
    from lit_align.models import load_causal_lm

    torch.manual_seed(4)
    model = load_causal_lm("tiny-llama")
    sequences = torch.randint(0, model.config.vocab_size, (3, 14))
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :3] = 0  # a shorter prompt, left-padded
    attention_mask[2, -2:] = 0  # a response that ended early
    results = []
    for chunk in (None, 5):
        model.zero_grad()
        out = response_logprobs(model, sequences, attention_mask, 6, 0.7, True, True, chunk)
        (out.logps * torch.linspace(-1, 1, out.logps.numel()).view_as(out.logps)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert chunked.logps.shape == (3, 8)
    for mine, theirs in zip(chunked, plain, strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_the_sampling_modules_route_their_training_forwards_through_the_chunked_head(hh_dir):
    """GRPO with ``logprob_chunk_size``: the output layer never runs on a whole sequence (only on generation's
    one-position steps); without it, it does."""
    import lightning as L
    from helpers import fit, hh_prompts

    from lit_align import GRPOModule

    widest = {}
    for chunk in (None, 4):
        L.seed_everything(0)
        module = GRPOModule(
            model="tiny-llama",
            reward_funcs=[lambda prompts, completions, **kwargs: [float(len(c)) for c in completions]],
            num_generations=2,
            sampling={"max_new_tokens": 4},
            beta=0.04,
            num_iterations=2,
            logprob_chunk_size=chunk,
        )
        module.configure_model()
        widths: list[int] = []
        module.policy.get_output_embeddings().register_forward_hook(
            lambda head, inputs, output, widths=widths: widths.append(inputs[0].shape[1])
        )
        fit(module, hh_prompts(hh_dir, batch_size=2, limit_train=2), max_steps=2)
        widest[chunk] = max(widths)
    assert widest[None] > 1 and widest[4] == 1
