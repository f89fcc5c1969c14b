"""Multi30k pivot translation: real-file loading with line alignment, the misalignment error, the pivot reward."""

from __future__ import annotations

import gzip

import pytest
import torch
from sacrebleu.metrics import BLEU

from datamodules import PivotTranslationDataModule
from datamodules.multi30k import INSTRUCTION, translation_prompt
from datamodules.readers import DataValidationError
from lit_align.rewards import PivotBLEUReward


def test_real_multi30k_rows_are_line_aligned(shared_data, tokenizer):
    directory = shared_data / "multi30k"
    dm = PivotTranslationDataModule(data_path=str(directory), val_split="val", limit_train=4, batch_size=4)
    dm.attach(tokenizer, "prompt").setup("fit")
    lines = {
        lang: gzip.open(directory / f"val.{lang}.gz", "rt", encoding="utf-8").read().splitlines()
        for lang in ("en", "fr", "de")
    }
    records = dm.dataset("val").records
    assert len(records) == len(lines["en"]) == 1014
    for i in (0, 500, 1013):  # the i-th record carries the i-th line of every language
        assert records[i]["source"] == lines["en"][i].strip()
        assert records[i]["reference"] == lines["fr"][i].strip()
        assert records[i]["reference_de"] == lines["de"][i].strip()
        assert lines["en"][i].strip() in records[i]["prompt"]
    batch = next(iter(dm.dataloader("val")))
    assert batch["reference_de"] == [r["reference_de"] for r in records[:4]]


def test_misaligned_files_name_the_files(tmp_path, tokenizer):
    for lang, count in (("en", 3), ("fr", 3), ("de", 2)):
        (tmp_path / f"train.{lang}").write_text("".join(f"{lang} sentence {i}\n" for i in range(count)))
    dm = PivotTranslationDataModule(data_path=str(tmp_path), val_split=None)
    with pytest.raises(DataValidationError, match=r"not aligned.*train\.de"):
        dm.setup("fit")  # the files are read (and checked) before any tokenizer is attached


def test_prompts_use_the_attached_tokenizer_after_setup(tmp_path, tokenizer):
    for lang in ("en", "fr", "de"):
        (tmp_path / f"train.{lang}").write_text(f"{lang} one\n{lang} two\n")
    dm = PivotTranslationDataModule(data_path=str(tmp_path), val_split=None, batch_size=2)
    dm.setup("fit")  # Lightning's order: no tokenizer yet, so the chat-templated prompts wait for attach
    dm.attach(tokenizer, "prompt")
    prompts = [r["prompt"] for r in dm.dataset("train").records]
    assert prompts == [translation_prompt(tokenizer, INSTRUCTION.format(sentence=f"en {w}")) for w in ("one", "two")]
    assert prompts[0].startswith("<|im_start|>")  # the embedded tokenizer's chat template


def test_pivot_reward_is_bleu_of_the_german_leg_and_reports_the_french_leg():
    reward = PivotBLEUReward(translator="tiny-llama", max_new_tokens=6)
    french = ["Un homme dort.", "Deux chiens jouent dans la neige."]
    batch = {
        "reference": ["Un homme dort.", "Un chat mange."],
        "reference_de": ["Ein Mann schläft.", "Zwei Hunde spielen."],
    }
    instruction = "Translate this French sentence into German. Answer with the translation only.\n" + french[0]
    assert reward.translation_prompt(" " + french[0]) == translation_prompt(reward.tokenizer, instruction)
    german = reward.translate(french)
    bleu = BLEU(effective_order=True)
    expected = [bleu.sentence_score(g, [r]).score / 100 for g, r in zip(german, batch["reference_de"], strict=True)]
    torch.testing.assert_close(reward(["", ""], french, batch), torch.tensor(expected))
    french_leg = reward.task_scores(["", ""], french, batch)["drift/bleu_fr"]
    assert french_leg[0] == pytest.approx(1.0)
    assert french_leg[1] == pytest.approx(bleu.sentence_score(french[1], [batch["reference"][1]]).score / 100)


def test_french_perplexity_under_the_frozen_pivot_model():
    reward = PivotBLEUReward(translator="tiny-llama")
    sentence = "Un homme dort."
    ids = reward.tokenizer(sentence, add_special_tokens=False).input_ids
    ids = torch.tensor([[reward.tokenizer.eos_token_id, *ids]])
    with torch.no_grad():
        logprobs = torch.log_softmax(reward.translator(input_ids=ids).logits[0, :-1].double(), -1)
    expected = torch.exp(-logprobs.gather(-1, ids[0, 1:, None]).mean())
    assert reward.french_perplexity([sentence])[0].item() == pytest.approx(expected.item(), rel=1e-4)
