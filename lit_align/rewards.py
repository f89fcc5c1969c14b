"""Reward functions: frozen ``nn.Module``s called as ``reward(prompts, completions, batch) -> Tensor[B]``.

Every reward here is frozen (no parameter requires grad, eval mode) and never enters an optimizer. Rewards that
read text score either the completion alone (``text="completion"``, the default) or the prompt followed by the
completion (``text="full"``, as TRL's IMDB sentiment example does).
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from datamodules.collation import pad_rows
from datamodules.keys import INDEX

TEXT_CHOICES = ("completion", "full")


# ---- the one check of what a reward returns ------------------------------------------------------------------


class RewardError(ValueError):
    """A reward returned something other than one finite number per completion; the message names the reward and
    the rows, so a bad reward is not mistaken for a bad learning rate."""


def reward_name(reward: Any) -> str:
    """How errors and metrics name a reward: a function's ``__name__`` (``<lambda>`` too), else its class name; a
    ``functools.partial`` by its function and a :class:`CallableReward` by the callable it wraps."""
    reward = getattr(reward, "func", reward)  # functools.partial
    reward = getattr(reward, "fn", reward) if isinstance(reward, CallableReward) else reward
    return reward.__name__ if hasattr(reward, "__name__") else type(reward).__name__


def _is_number(value: Any) -> bool:
    if torch.is_tensor(value):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real)  # bool, int, float, numpy scalars


def _rows(indices: list[int], batch: dict | None) -> str:
    """``completions [1, 3] (dataset index [17, 40])``: which rows of the rollout, and of the dataset when the
    batch carries ``INDEX``."""
    shown = indices[:10]
    more = f" and {len(indices) - len(shown)} more" if len(indices) > len(shown) else ""
    text = f"completions {shown}{more}"
    index = batch.get(INDEX) if isinstance(batch, dict) else None
    if index is not None and len(index) > max(shown):
        text += f" (dataset index {[int(index[i]) for i in shown]})"
    return text


def check_reward_scores(
    values: Any,
    reward: Any,
    completions: Sequence[str],
    batch: dict | None = None,
    *,
    allow_none: bool = False,
    name: str | None = None,
) -> Tensor:
    """The scores ``values`` that ``reward`` gave ``completions``, as a float tensor ``[len(completions)]``, or a
    :class:`RewardError` naming the reward (``name``, default :func:`reward_name`) and the rows: a value that is no
    sequence or tensor, strings or other non-numbers, the wrong count, or NaN / ±Inf. Every caller of a reward
    (``RewardFunction.forward``, PPO's and GRPO's scoring) goes through here, before any loss is computed.

    ``allow_none``: ``None`` marks a completion the function does not apply to (TRL's GRPO reward functions) and
    becomes NaN; an explicit NaN is still refused. A tensor keeps its device.
    """
    label, count = repr(name or reward_name(reward)), len(completions)
    if torch.is_tensor(values):
        if values.numel() != count:
            raise RewardError(
                f"reward {label} returned {values.numel()} scores for {count} completions (a tensor of shape "
                f"{tuple(values.shape)}); a reward returns one number per completion"
            )
        if values.is_complex():
            raise RewardError(f"reward {label} returned complex scores; a reward returns real numbers")
        scores, missing = values.detach().flatten().float(), None
    else:
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
            raise RewardError(
                f"reward {label} returned {type(values).__name__} {_short(values)}, not a list or tensor of {count} "
                "numbers (one per completion)"
            )
        items = list(values)
        if len(items) != count:
            raise RewardError(f"reward {label} returned {len(items)} scores for {count} completions")
        bad = [i for i, v in enumerate(items) if not (_is_number(v) or (allow_none and v is None))]
        if bad:
            kinds = sorted({type(items[i]).__name__ for i in bad})
            raise RewardError(
                f"reward {label} returned {'/'.join(kinds)} instead of a number at {_rows(bad, batch)}, e.g. "
                f"{_short(items[bad[0]])}; a reward returns one number per completion"
            )
        missing = torch.tensor([v is None for v in items], dtype=torch.bool)
        scores = torch.tensor([float("nan") if v is None else float(v) for v in items], dtype=torch.float32)
    nonfinite = ~torch.isfinite(scores)
    if missing is not None:
        nonfinite = nonfinite & ~missing.to(scores.device)
    if nonfinite.any():
        flags = nonfinite.cpu()
        values_cpu = scores.cpu()
        parts = [
            f"{kind} at {_rows(rows, batch)}"
            for kind, rows in (
                ("nan", [i for i in range(count) if flags[i] and values_cpu[i].isnan()]),
                ("inf", [i for i in range(count) if flags[i] and values_cpu[i].isinf()]),
            )
            if rows
        ]
        first = int(flags.nonzero()[0])
        hint = "; return None for a completion the function does not apply to" if allow_none else ""
        raise RewardError(
            f"reward {label} returned non-finite scores: {'; '.join(parts)} (completion {first}: "
            f"{_short(completions[first])}); the reward is at fault, not the training{hint}"
        )
    return scores


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


class RewardFunction(nn.Module):
    """Base class: subclasses implement ``score(prompts, completions, batch)``; ``forward`` freezes and no-grads."""

    def __init__(self, text: str = "completion") -> None:
        super().__init__()
        if text not in TEXT_CHOICES:
            raise ValueError(f"text={text!r}: choose one of {TEXT_CHOICES}")
        self.text = text

    def texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return (
            list(completions)
            if self.text == "completion"
            else [p + c for p, c in zip(prompts, completions, strict=True)]
        )

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None = None) -> Tensor:
        """One float score per completion; anything else raises a ``RewardError`` (:func:`check_reward_scores`)."""
        return check_reward_scores(self.score(prompts, completions, batch), self, completions, batch)

    def train(self, mode: bool = True) -> RewardFunction:  # rewards stay frozen whatever Lightning sets
        return super().train(False)

    def freeze(self) -> RewardFunction:
        self.requires_grad_(False)
        return self.eval()


class LexiconSentimentReward(RewardFunction):
    """VADER compound sentiment in [−1, 1] (Hutto & Gilbert 2014); runs offline, no model weights.

    Args:
        sign: +1 rewards positive sentiment, −1 negative.
        text: score the ``completion`` alone or the ``full`` prompt + completion.
    """

    def __init__(self, sign: float = 1.0, text: str = "completion") -> None:
        super().__init__(text)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.sign = sign
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        compound = [self.analyzer.polarity_scores(text)["compound"] for text in self.texts(prompts, completions)]
        return self.sign * torch.tensor(compound)


class ClassifierReward(RewardFunction):
    """A Hugging Face sequence classifier (Hub id or local directory) as a reward, e.g. an IMDB sentiment model.

    Args:
        model: Hub id or directory of an ``AutoModelForSequenceClassification``.
        label_index: which output is the reward (e.g. 1 = "positive").
        output: ``logit`` (raw score), ``probability`` (softmax over labels) or ``log_probability``.
        text: score the ``completion`` alone or the ``full`` prompt + completion.
        max_length: classifier input tokens (longer texts are truncated by the classifier's tokenizer).
        batch_size: texts per classifier forward.
    """

    OUTPUTS = ("logit", "probability", "log_probability")

    def __init__(
        self,
        model: str,
        label_index: int = 1,
        output: str = "logit",
        text: str = "completion",
        max_length: int = 512,
        batch_size: int = 32,
    ) -> None:
        super().__init__(text)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lit_align.models import resolve

        if output not in self.OUTPUTS:
            raise ValueError(f"output={output!r}: choose one of {self.OUTPUTS}")
        self.classifier = AutoModelForSequenceClassification.from_pretrained(resolve(model))
        self.tokenizer = AutoTokenizer.from_pretrained(resolve(model, "tokenizer"))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.classifier.config.pad_token_id = self.tokenizer.pad_token_id
        labels = self.classifier.config.num_labels
        if not 0 <= label_index < labels:
            raise ValueError(f"label_index={label_index} but the classifier {model} has {labels} labels")
        self.label_index, self.output = label_index, output
        self.max_length, self.batch_size = max_length, batch_size
        self.freeze()

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        texts = self.texts(prompts, completions)
        device = next(self.classifier.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            logits = self.classifier(**inputs).logits.float()
            if self.output == "probability":
                logits = logits.softmax(-1)
            elif self.output == "log_probability":
                logits = logits.log_softmax(-1)
            scores.append(logits[:, self.label_index])
        return torch.cat(scores)


class LearnedReward(RewardFunction):
    """A reward model trained with :class:`~lit_align.RewardModelModule` and exported (``export_dir``).

    Scores ``prompt + completion + EOS`` at its last token, exactly as the module did in training.
    """

    def __init__(self, model: str, max_length: int = 1024, batch_size: int = 16) -> None:
        super().__init__("full")
        from lit_align.models import load_sequence_classifier, load_tokenizer

        self.model = load_sequence_classifier(model)
        self.tokenizer = load_tokenizer(model)
        self.max_length, self.batch_size = max_length, batch_size
        self.freeze()

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        from lit_align.reward_model import last_token_scores

        eos = self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            ids = [
                (
                    self.tokenizer(p, add_special_tokens=False).input_ids
                    + self.tokenizer(c, add_special_tokens=False).input_ids
                )[: self.max_length - 1]
                + [eos]
                for p, c in zip(prompts[chunk], completions[chunk], strict=True)
            ]
            input_ids, attention_mask = pad_rows(ids, eos)
            scores.append(last_token_scores(self.model, input_ids.to(device), attention_mask.to(device)))
        return torch.cat(scores)


class SentenceBLEUReward(RewardFunction):
    """Sentence BLEU (sacrebleu, Post 2018) of each completion against ``batch["reference"]``, scaled to [0, 1]."""

    def __init__(self, reference_key: str = "reference", tokenize: str = "13a") -> None:
        super().__init__("completion")
        from sacrebleu.metrics import BLEU

        self.reference_key = reference_key
        self.bleu = BLEU(tokenize=tokenize, effective_order=True)

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        if batch is None or self.reference_key not in batch:
            raise ValueError(f"SentenceBLEUReward needs batch['{self.reference_key}'] with reference strings")
        references = batch[self.reference_key]
        return torch.tensor(
            [self.bleu.sentence_score(c, [r]).score / 100.0 for c, r in zip(completions, references, strict=True)]
        )


class WeightedSumReward(RewardFunction):
    """Σ_i w_i · r_i(x, y) over several rewards (e.g. task reward + a length or format penalty)."""

    def __init__(self, rewards: list[RewardFunction], weights: list[float] | None = None) -> None:
        super().__init__("completion")
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if len(weights) != len(rewards) or not rewards:
            raise ValueError(f"WeightedSumReward got {len(rewards)} rewards and {len(weights)} weights")
        self.rewards = nn.ModuleList(rewards)
        self.weights = weights

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        return sum(w * r(prompts, completions, batch) for w, r in zip(self.weights, self.rewards, strict=True))


class CallableReward(RewardFunction):
    """Any Python callable ``fn(prompts, completions) -> list[float] | Tensor`` (or ``"package.module.fn"``)."""

    def __init__(self, fn: Callable | str, pass_batch: bool = False) -> None:
        super().__init__("completion")
        if isinstance(fn, str):
            module_name, _, attribute = fn.rpartition(".")
            if not module_name:
                raise ValueError(f"CallableReward: '{fn}' is not an import path like 'package.module.function'")
            fn = getattr(importlib.import_module(module_name), attribute)
        self.fn, self.pass_batch = fn, pass_batch

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        values = self.fn(prompts, completions, batch) if self.pass_batch else self.fn(prompts, completions)
        return check_reward_scores(values, self.fn, completions, batch)


class FeatureReward(RewardFunction):
    """A per-text feature (e.g. ``lit_align.ebm.WordFeature``, any ``str -> float``) scored on the completion:
    the RL counterpart of a distribution-matching constraint."""

    def __init__(self, feature: Callable[[str], float]) -> None:
        super().__init__("completion")
        self.feature = feature

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        return check_reward_scores([self.feature(text) for text in completions], self.feature, completions, batch)


class PivotBLEUReward(RewardFunction):
    """Pivot-translation reward (Lee et al. 2019; Noukhovitch et al. 2023): a frozen causal LM translates the
    policy's French into German (greedy), and the reward is the sentence BLEU of that German against
    ``batch["reference_de"]``, in [0, 1]. ``task_scores`` also gives the French leg: sentence BLEU of the policy's
    French against ``batch["reference"]`` (``drift/bleu_fr``), the language-drift score of the benchmark.

    Args:
        translator: the frozen FR→DE model (Hub id, directory or alias); an instruction prompt is used.
        max_new_tokens: German tokens to generate. batch_size: sentences per translator call.
        instruction: the translator's instruction, ``{}`` = the French sentence; it becomes a user turn of the
            translator tokenizer's chat template, or ``instruction + "\\nTranslation:"`` without one (the format of
            the Multi30k policy prompts, ``datamodules.multi30k.translation_prompt``).
    """

    task_score_names = ("drift/bleu_fr", "drift/fr_perplexity")

    def __init__(
        self,
        translator: str = "smollm2-135m-instruct",
        max_new_tokens: int = 48,
        batch_size: int = 16,
        instruction: str = "Translate this French sentence into German. Answer with the translation only.\n{}",
    ) -> None:
        super().__init__("completion")
        from sacrebleu.metrics import BLEU

        from lit_align.models import load_causal_lm, load_tokenizer

        self.translator = load_causal_lm(translator)
        self.tokenizer = load_tokenizer(translator)
        self.max_new_tokens, self.batch_size, self.instruction = max_new_tokens, batch_size, instruction
        self.bleu = BLEU(effective_order=True)
        self.freeze()

    def translation_prompt(self, french: str) -> str:
        """The translator's prompt for one French sentence (see ``instruction``)."""
        instruction = self.instruction.format(french.strip())
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": instruction}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return instruction + "\nTranslation:"

    def translate(self, french: Sequence[str]) -> list[str]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.translator.parameters()).device
        german = []
        for start in range(0, len(french), self.batch_size):
            prompts = [self.translation_prompt(s) for s in french[start : start + self.batch_size]]
            rows = self.tokenizer(prompts, add_special_tokens=False).input_ids
            input_ids, attention_mask = pad_rows(rows, pad, "left")  # left padding for generation
            width = input_ids.shape[1]
            out = self.translator.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            german += [t.strip() for t in self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        return german

    def _sentence_bleu(self, hypotheses: Sequence[str], references: Sequence[str]) -> Tensor:
        return torch.tensor(
            [
                self.bleu.sentence_score(h.strip(), [r]).score / 100.0
                for h, r in zip(hypotheses, references, strict=True)
            ]
        )

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch: dict | None) -> Tensor:
        if batch is None or "reference_de" not in batch:
            raise ValueError("PivotBLEUReward needs batch['reference_de'] (PivotTranslationDataModule provides it)")
        return self._sentence_bleu(self.translate(completions), batch["reference_de"])

    def french_perplexity(self, french: Sequence[str]) -> Tensor:
        """Per-sentence perplexity of the French under the frozen pivot model used as a plain LM (no prompt):
        how natural the policy's French still is, the second drift score of the pivot game."""
        from lit_align.logprobs import token_logprobs

        device = next(self.translator.parameters()).device
        values = []
        for sentence in french:
            ids = self.tokenizer(sentence.strip() or ".", add_special_tokens=False, return_tensors="pt").input_ids
            ids = torch.cat([torch.tensor([[self.tokenizer.eos_token_id]]), ids], dim=1).to(device)  # EOS as start
            logits = self.translator(input_ids=ids, use_cache=False).logits
            values.append(torch.exp(-token_logprobs(logits[:, :-1].float(), ids[:, 1:]).mean()))
        return torch.stack(values).cpu()

    @torch.no_grad()
    def task_scores(self, prompts: Sequence[str], completions: Sequence[str], batch: dict) -> dict[str, Tensor]:
        return {
            "drift/bleu_fr": self._sentence_bleu(completions, batch["reference"]),
            "drift/fr_perplexity": self.french_perplexity(completions),
        }
