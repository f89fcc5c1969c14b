"""``compile_layers``: every decoder layer of the policy and the reference is compiled, and a DPO step gives the
loss and gradients of the eager step. Slow (inductor compiles for ~1 min on 2 cores); needs a C++ compiler."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import hh_pairs

from lit_align import DPOModule
from lit_align.models import decoder_layers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"),
]


def test_compiled_layers_give_the_eager_loss_and_gradients(hh_dir):
    results = []
    for compile_layers in (False, True):
        module = DPOModule(model="tiny-llama", compile_layers=compile_layers)
        module.configure_model()
        module.log = lambda *args, **kwargs: None  # outside a Trainer
        compiled = [layer._compiled_call_impl is not None for layer in decoder_layers(module.policy)]
        compiled += [layer._compiled_call_impl is not None for layer in decoder_layers(module.reference)]
        assert len(compiled) == 4 and all(compiled) == compile_layers and any(compiled) == compile_layers
        data = hh_pairs(hh_dir, limit_train=4, max_length=64, max_prompt_length=40).attach(module.tokenizer, "pair")
        data.setup("fit")
        batch = next(iter(data.dataloader("train")))
        # one step away from policy == reference, so the loss has a gradient that depends on both forwards
        with torch.no_grad():
            for parameter in module.policy.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
        loss = module.shared_step(batch, "train")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-3)
