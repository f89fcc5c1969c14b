"""Multi30k pivot translation: real-file loading with line alignment, the misalignment error, the pivot reward."""

from __future__ import annotations

import gzip

import pytest
import torch
from sacrebleu.metrics import BLEU

from datamodules import PivotTranslationDataModule
from datamodules.base import DataValidationError
from lit_align.rewards import PivotBLEUReward


def test_real_multi30k_rows_are_line_aligned(shared_data, tokenizer):
    directory = shared_data / "multi30k"
    dm = PivotTranslationDataModule(data_path=str(directory), val_split="val", limit_train=4, batch_size=4)
    dm.configure(tokenizer=tokenizer, mode="prompt").setup("fit")
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
    dm = PivotTranslationDataModule(data_path=str(tmp_path), val_split=None).configure(
        tokenizer=tokenizer, mode="prompt"
    )
    with pytest.raises(DataValidationError, match=r"not aligned.*train\.de"):
        dm.setup("fit")


def test_pivot_reward_is_bleu_of_the_german_leg_and_reports_the_french_leg():
    reward = PivotBLEUReward(translator="tiny-llama", max_new_tokens=6)
    french = ["Un homme dort.", "Deux chiens jouent dans la neige."]
    batch = {
        "reference": ["Un homme dort.", "Un chat mange."],
        "reference_de": ["Ein Mann schläft.", "Zwei Hunde spielen."],
    }
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
