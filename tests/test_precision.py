"""bf16: mixed precision trains like fp32 within stated tolerances, a bf16 reference's log-probs stay close to fp32's,
the chunked head under autocast matches the plain head under autocast, and ``precision: auto`` picks bf16 only on
hardware with bf16 matrix units."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import fit, hh_pairs, validate

from lit_align import DPOModule
from lit_align.cli import AlignTrainer
from lit_align.logprobs import sequence_logprobs
from lit_align.models import load_causal_lm
from lit_align.precision import cpu_has_bf16_matmul, fastest_precision


def test_cpu_bf16_detection_agrees_with_torchs_own_probe():
    probe = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_bf16_matmul() == probe
    assert fastest_precision("cpu") == ("bf16-mixed" if probe else "32-true")
    assert fastest_precision("mps") == "32-true"


def test_auto_precision_reaches_the_trainer():
    trainer = AlignTrainer(accelerator="cpu", precision="auto", logger=False, enable_checkpointing=False)
    expected = "bf16-mixed" if cpu_has_bf16_matmul() else "32-true"
    assert trainer.precision == expected
    assert AlignTrainer(accelerator="cpu", precision="32-true", logger=False).precision == "32-true"


def train_dpo(hh_dir, precision: str, **module_settings) -> tuple[dict[str, float], list[float]]:
    """The tiny-llama DPO run of test_modules.py::test_dpo_learns_the_training_preferences at ``precision``:
    held-out-free metrics on the 16 training pairs after 6 epochs, and the loss of every step."""
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", beta=0.1, learning_rate=2e-3, lr_scheduler="constant", **module_settings)
    data = hh_pairs(hh_dir, holdout=0, limit_train=16, batch_size=8, max_length=48, max_prompt_length=32, shuffle=True)
    data.attach(module.tokenizer, "pair")
    module.configure_model()
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    fit(module, data, callbacks=[Losses()], max_epochs=6, precision=precision)
    data.setup("validate")
    return validate(module, data.dataloader("train")), losses


def test_bf16_mixed_dpo_trains_like_fp32(hh_dir):
    fp32, fp32_losses = train_dpo(hh_dir, "32-true")
    bf16, bf16_losses = train_dpo(hh_dir, "bf16-mixed")
    assert len(bf16_losses) == len(fp32_losses) == 12
    # step 0: policy == reference, and under autocast both round the same way: the loss is exactly ln 2
    assert bf16_losses[0] == fp32_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    # the training curve and the result (measured: losses within 2.6e-4 at every step; margins 2.616 vs 2.614,
    # accuracy 1.0 both, loss 0.0793 vs 0.0794)
    assert max(abs(a - b) for a, b in zip(bf16_losses, fp32_losses, strict=True)) < 0.005
    assert bf16["eval_rewards/accuracies"] == fp32["eval_rewards/accuracies"] == 1.0
    assert bf16["eval_rewards/margins"] == pytest.approx(fp32["eval_rewards/margins"], rel=0.02)
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], abs=0.005)


def test_a_bf16_reference_scores_sequences_within_bf16_rounding_of_fp32(hh_dir, tokenizer):
    """The embedded SmolLM2 on 16 HH completions of 6–128 tokens: sequence log-probs of a bf16 copy against fp32
    (measured: |Δ| 0.01–0.73 nats per sequence, mean 0.28, ≈ 0.3 % of |log π|; ≤ 0.073 nats per token). Under
    bf16-mixed an fp32 reference shares the policy's rounding, so the DPO margin at step 0 is exactly 0; a bf16
    reference shifts each implicit reward by β × these errors (0.03 at β = 0.1)."""
    data = hh_pairs(hh_dir, holdout=0, limit_train=16, batch_size=16, max_length=256, max_prompt_length=128)
    data.configure(tokenizer, mode="pair")
    data.setup("fit")
    batch = next(iter(data.dataloader("train")))
    fp32 = load_causal_lm("smollm2-135m-instruct").eval()
    bf16 = load_causal_lm("smollm2-135m-instruct", "bfloat16").eval()
    rows = [batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "completion_mask")]
    with torch.no_grad():
        exact = sequence_logprobs(fp32, *rows)
        rounded = sequence_logprobs(bf16, *rows)
    error = (rounded.logps - exact.logps).abs()
    assert rounded.logps.dtype == torch.float32
    assert float(error.mean()) < 0.01 * float(exact.logps.abs().mean())
    assert float((error / exact.tokens).mean()) < 0.02  # nats per token
    assert float((error / exact.tokens).max()) < 0.1


def test_the_chunked_head_under_autocast_matches_the_plain_head_under_autocast():
    torch.manual_seed(0)
    model = load_causal_lm("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    results = []
    for chunk in (None, 4):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = sequence_logprobs(model, ids, mask, completion, chunk_size=chunk).logps
        logps.sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert torch.allclose(chunked, plain, rtol=1e-3, atol=0.05)
    for name, grad in plain_grads.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert float((chunked_grads[name] - grad).abs().max() / scale) < 0.05, name


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_adamw_is_fused_on_cpu_and_gradients_are_still_clipped(hh_dir, precision):
    """configure_optimizers asks torch for its fused AdamW on CPU/CUDA; Lightning's mixed-precision plugin refuses to
    clip a fused optimizer's gradients unless told no GradScaler unscales them, so clipping is checked at every step:
    the gradients AdamW stepped with have a norm of at most ``gradient_clip_val``."""
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", learning_rate=1e-3)
    data = hh_pairs(hh_dir, holdout=0, limit_train=16, batch_size=8, max_length=48, max_prompt_length=32)
    norms: list[float] = []

    class RecordNormsInsideTheStep(L.Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            assert optimizer.defaults["fused"] is True
            optimizer.register_step_post_hook(  # Lightning's closure (backward, clipping) runs in step
                lambda opt, args, kwargs: norms.append(
                    float(
                        torch.stack(
                            [p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]
                        ).norm()
                    )
                )
            )

    fit(module, data, [RecordNormsInsideTheStep()], max_steps=2, precision=precision, gradient_clip_val=1e-3)
    assert len(norms) == 2 and max(norms) <= 1e-3 * (1 + 1e-4), norms
