"""Reward functions: each against an independent computation in the test."""

from __future__ import annotations

import pytest
import torch
from sacrebleu.metrics import BLEU
from transformers import LlamaForSequenceClassification
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from lit_align.models import load_tokenizer, tiny_llama_config
from lit_align.reward_model import last_token_scores
from lit_align.rewards import (
    CallableReward,
    ClassifierReward,
    LearnedReward,
    LexiconSentimentReward,
    SentenceBLEUReward,
    WeightedSumReward,
)

PROMPTS = ["The film opens with", "I watched this movie and"]
COMPLETIONS = [" a wonderful, moving and beautiful scene.", " it was a boring, awful waste of time."]


def letter_count(prompts, completions):
    return [completion.count("e") for completion in completions]


def save_tiny_classifier(directory, num_labels: int, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer("tiny-llama")
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=num_labels, pad_token_id=0)).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def test_lexicon_sentiment_is_vader_compound_with_sign_and_text_choice():
    analyzer = SentimentIntensityAnalyzer()
    reward = LexiconSentimentReward()
    scores = reward(PROMPTS, COMPLETIONS)
    expected = [analyzer.polarity_scores(c)["compound"] for c in COMPLETIONS]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert scores[0] > 0.5 and scores[1] < -0.5
    torch.testing.assert_close(LexiconSentimentReward(sign=-1.0)(PROMPTS, COMPLETIONS), -scores)
    full = LexiconSentimentReward(text="full")(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(
        full,
        torch.tensor([analyzer.polarity_scores(p + c)["compound"] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]),
    )


def test_classifier_reward_matches_a_manual_forward(tmp_path):
    model = save_tiny_classifier(tmp_path, num_labels=2)
    tokenizer = load_tokenizer("tiny-llama")
    reward = ClassifierReward(str(tmp_path), label_index=1, output="probability", text="full")
    assert not any(p.requires_grad for p in reward.parameters())
    scores = reward(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
            ids = tokenizer(prompt + completion, return_tensors="pt").input_ids  # one text: no padding involved
            probability = model(input_ids=ids).logits.softmax(-1)[0, 1]
            torch.testing.assert_close(scores[i], probability, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="2 labels"):
        ClassifierReward(str(tmp_path), label_index=2)


def test_learned_reward_scores_prompt_completion_eos_at_the_last_token(tmp_path):
    model = save_tiny_classifier(tmp_path, num_labels=1, seed=3)
    tokenizer = load_tokenizer("tiny-llama")
    scores = LearnedReward(str(tmp_path))(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
            ids = (
                tokenizer(prompt, add_special_tokens=False).input_ids
                + tokenizer(completion, add_special_tokens=False).input_ids
            )
            ids = torch.tensor([ids + [tokenizer.eos_token_id]])
            hidden = model.model(input_ids=ids).last_hidden_state
            torch.testing.assert_close(scores[i], model.score(hidden[0, -1]).squeeze(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(scores[i], last_token_scores(model, ids, torch.ones_like(ids))[0])


def test_sentence_bleu_reward():
    references = ["the cat sat on the mat", "a man rides a red bicycle"]
    completions = ["the cat sat on the mat", "a man is riding a bicycle"]
    scores = SentenceBLEUReward()(PROMPTS, completions, {"reference": references})
    assert scores[0] == pytest.approx(1.0)
    expected = BLEU(effective_order=True).sentence_score(completions[1], [references[1]]).score / 100
    assert scores[1] == pytest.approx(expected) and 0 < scores[1] < 1
    assert SentenceBLEUReward()(PROMPTS, ["zzz qqq", "xx yy"], {"reference": references}).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="reference"):
        SentenceBLEUReward()(PROMPTS, completions, {})


def test_weighted_sum_and_callables():
    by_name = CallableReward(f"{__name__}.letter_count")
    direct = CallableReward(lambda prompts, completions: [len(c) for c in completions])
    counts = [c.count("e") for c in COMPLETIONS]
    lengths = [len(c) for c in COMPLETIONS]
    assert by_name(PROMPTS, COMPLETIONS).tolist() == counts
    combined = WeightedSumReward([by_name, direct], weights=[2.0, -0.5])(PROMPTS, COMPLETIONS)
    assert combined.tolist() == pytest.approx([2 * e - 0.5 * n for e, n in zip(counts, lengths, strict=True)])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        CallableReward(lambda p, c: [1.0])(PROMPTS, COMPLETIONS)
