"""The LightningModules on real HH pairs with a tiny Llama: learning, reference handling, export, safety."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import fit, hh_pairs, validate
from transformers import AutoModelForCausalLM

from lit_align import DPOModule, KTOModule, LoraSettings, RewardModelModule, SFTModule
from lit_align.models import tiny_llama

# 16 shuffled training pairs in batches of 8, no validation set
hh = partial(hh_pairs, holdout=0, limit_train=16, batch_size=8, max_length=48, max_prompt_length=32, shuffle=True)


def evaluate_on_train(module, datamodule) -> dict[str, float]:
    """Validation metrics on the training pairs themselves (the set the module was fitted on)."""
    datamodule.setup("validate")
    return validate(module, datamodule.dataloader("train"))


def fit_and_evaluate(module, data, data_mode: str, **trainer) -> tuple[dict[str, float], dict[str, float]]:
    """``evaluate_on_train`` before and after fitting ``module`` to ``data`` (Trainer settings as keywords)."""
    data.attach(module.tokenizer, data_mode)
    module.configure_model()
    before = evaluate_on_train(module, data)
    fit(module, data, **trainer)
    return before, evaluate_on_train(module, data)


def test_dpo_learns_the_training_preferences(hh_dir):
    torch.manual_seed(0)
    module = DPOModule(model="tiny-llama", beta=0.1, learning_rate=2e-3, lr_scheduler="constant")
    before, after = fit_and_evaluate(module, hh(hh_dir), "pair", max_epochs=6)  # measured: margins 2.6, loss −0.61
    assert before["eval_rewards/accuracies"] == 0.0  # policy == reference: every margin is exactly 0
    assert after["eval_rewards/accuracies"] > 0.9
    assert after["eval_rewards/margins"] > 0.5
    assert after["eval_loss"] < before["eval_loss"] - 0.2


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust", "simpo"])
def test_dpo_variants_train_and_improve_margins(hh_dir, loss_type):
    torch.manual_seed(0)
    kwargs = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    module = DPOModule(model="tiny-llama", loss_type=loss_type, learning_rate=2e-3, lr_scheduler="constant", **kwargs)
    data = hh(hh_dir)
    fit(module, data, max_epochs=2)
    after = evaluate_on_train(module, data)
    assert after["eval_rewards/margins"] > 0  # measured after 2 epochs: 0.91-0.95, SimPO 0.06
    assert (module.reference is None) == (loss_type == "simpo")


def test_precomputed_reference_gives_the_same_training_and_releases_the_reference(hh_dir):
    runs = {}
    for precompute in (False, True):
        torch.manual_seed(0)
        module = DPOModule(model="tiny-llama", learning_rate=1e-3, precompute_ref_logps=precompute)
        data = hh(hh_dir, limit_train=16, holdout=8)
        fit(module, data, max_steps=3, limit_val_batches=1)
        runs[precompute] = module
    assert runs[True].reference is None and runs[False].reference is not None
    assert set(runs[True].reference_table) == {"train", "val"}
    with_reference, with_table = runs[False].policy.state_dict(), runs[True].policy.state_dict()
    assert with_reference.keys() == with_table.keys()
    # Same updates up to float noise: the table's log-probs come from batches of another size (1e-6 apart), which
    # Adam's sign-like first steps can turn into ~lr on single elements; so compare the whole update, relatively.
    initial = tiny_llama(0).state_dict()
    gap = sum(float((with_reference[k] - with_table[k]).double().pow(2).sum()) for k in initial)
    update = sum(float((with_reference[k] - v).double().pow(2).sum()) for k, v in initial.items())
    assert update > 0 and (gap / update) ** 0.5 < 1e-3


def test_lora_reference_is_the_policy_with_adapters_disabled(hh_dir):
    torch.manual_seed(0)
    module = DPOModule(
        model="tiny-llama",
        learning_rate=5e-3,
        lr_scheduler="constant",
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    data = hh(hh_dir)
    module.configure_model()
    assert module.reference is None
    trainable = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    assert trainable < 0.05 * sum(p.numel() for p in module.policy.parameters())
    fit(module, data, max_epochs=3)
    after = evaluate_on_train(module, data)
    assert after["eval_rewards/margins"] > 0  # adapters moved the policy away from the adapter-free reference
    # the reference forward really is the base model: equal to a fresh tiny model with the same seed
    batch = next(iter(data.dataloader("train")))
    fresh = DPOModule(model="tiny-llama")
    fresh.configure_model()
    inputs = (batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_completion_mask"])
    torch.testing.assert_close(module.reference_logprobs(*inputs).logps, fresh.policy_logprobs(*inputs).logps)


def test_kto_moves_desirable_and_undesirable_rewards_apart(hh_dir):
    torch.manual_seed(0)
    module = KTOModule(model="tiny-llama", beta=0.1, learning_rate=2e-3, lr_scheduler="constant")
    data = hh(hh_dir)
    fit(module, data, max_epochs=4)
    after = evaluate_on_train(module, data)
    assert after["eval_rewards/chosen"] > after["eval_rewards/rejected"] + 0.5  # measured: + 2.3
    torch.testing.assert_close(
        torch.tensor(after["eval_rewards/margins"]),
        torch.tensor(after["eval_rewards/chosen"] - after["eval_rewards/rejected"]),
        rtol=1e-4,
        atol=1e-4,
    )
    assert after["eval_kl"] >= 0


def test_kto_rejects_batch_size_one(hh_dir):
    module = KTOModule(model="tiny-llama")
    with pytest.raises(ValueError, match="2"):
        fit(module, hh(hh_dir, batch_size=1), max_steps=1)


def test_sft_loss_is_cross_entropy_on_completion_tokens(hh_dir):
    module = SFTModule(model="tiny-llama")
    module.configure_model()
    data = hh(hh_dir, limit_train=4).attach(module.tokenizer, "text")
    data.setup("fit")
    batch = next(iter(data.dataloader("train")))
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    loss = module.shared_step(batch, "train")
    logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    module.hparams.completion_only_loss = False
    labels_all = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
    expected_all = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels_all.flatten(), ignore_index=-100)
    torch.testing.assert_close(module.shared_step(batch, "train"), expected_all)


def test_sft_lowers_perplexity_and_exports_a_loadable_model(hh_dir, tmp_path):
    torch.manual_seed(0)
    module = SFTModule(model="tiny-llama", learning_rate=3e-3, export_dir=str(tmp_path / "export"))
    before, after = fit_and_evaluate(module, hh(hh_dir), "text", max_epochs=4)
    assert after["eval_perplexity"] < 0.5 * before["eval_perplexity"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = torch.tensor([[5, 17, 300, 2]])
    torch.testing.assert_close(reloaded(ids).logits, module.policy(ids).logits)


def test_reward_model_scores_the_last_real_token_and_learns(hh_dir):
    torch.manual_seed(0)
    module = RewardModelModule(model="tiny-llama", learning_rate=2e-3, lr_scheduler="constant")
    module.configure_model()
    # independent check of the pooling: with a pad id that never occurs, the HF head pools the last token
    ids = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])
    module.policy.config.pad_token_id = 0
    expected = module.policy(input_ids=ids).logits.squeeze(-1)
    torch.testing.assert_close(module.scores(ids, torch.ones_like(ids)), expected)
    # right padding: the score of a padded row equals the score of the same row unpadded
    padded = torch.tensor([[7, 8, 9, 2, 2]])
    torch.testing.assert_close(
        module.scores(padded, torch.tensor([[1, 1, 1, 0, 0]])), module.scores(padded[:, :3], torch.ones(1, 3))
    )
    data = hh(hh_dir)
    fit(module, data, max_epochs=10)
    after = evaluate_on_train(module, data)
    assert after["eval_rewards/accuracies"] > 0.9


def test_non_finite_loss_stops_training_with_a_clear_message(hh_dir):
    module = DPOModule(model="tiny-llama")
    module.configure_model()
    with torch.no_grad():
        module.policy.model.norm.weight.fill_(float("nan"))  # every logit becomes NaN
    with pytest.raises(FloatingPointError, match="non-finite loss .* global step 0 on dataset rows"):
        fit(module, hh(hh_dir, limit_train=8), max_steps=2)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="sigmoid"):
        DPOModule(model="tiny-llama", loss_type="dpo")


@pytest.mark.slow
def test_dpo_on_the_embedded_model_moves_margins_on_its_training_pairs(hh_dir):
    torch.manual_seed(0)
    module = DPOModule(
        model="smollm2-135m-instruct",
        learning_rate=1e-4,
        lr_scheduler="constant",
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
    )
    data = hh(hh_dir, limit_train=8, batch_size=4, max_length=96, max_prompt_length=64)
    fit(module, data, max_epochs=3)
    after = evaluate_on_train(module, data)
    assert after["eval_rewards/margins"] > 0.05
    assert after["eval_rewards/accuracies"] > 0.5


def test_kto_warns_when_weights_leave_the_papers_range(hh_dir):
    module = KTOModule(model="tiny-llama", desirable_weight=3.0)
    with pytest.warns(UserWarning, match=r"outside \[1, 4/3\].*n_D=8, n_U=8"):
        fit(module, hh(hh_dir, limit_train=8), max_steps=1)
