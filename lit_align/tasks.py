"""Task scores: the alignment tax measured on a task the policy should keep doing, not only as KL or perplexity.

The seed papers measure the tax on tasks — Lin et al. 2024 (*Mitigating the Alignment Tax of RLHF*) on reading
comprehension and common-sense benchmarks, Lu et al. 2024 (*Online Merging Optimizers*) on a suite of LM tasks. A
task (:class:`Task`) has a ``name``, ``statistics(model, tokenizer, rank, world_size)``: numbers over this rank's
share of the examples that add up across ranks, ``value(totals)``: the score from their sums, and
``estimate(model, tokenizer)``: the score in one process with a 95 % interval. ``callbacks.TaskScore`` sums the
statistics over ranks at every validation (exact under DDP / FSDP); ``lit-align evaluate --tasks`` reports the
estimates.

``FewShotSST2``: k-shot sentiment classification (accuracy; Wilson interval). ``Multi30kBLEU``: k-shot translation
of Multi30k sentences (Elliott et al. 2016), sacrebleu corpus BLEU (Post 2018) from summed n-gram statistics
(bootstrap interval). ``HeldoutPerplexity``: perplexity of held-out human text (a DataModule's ``heldout_texts`` or a
file; bootstrap interval). ``LMEvalTask``: any lm-evaluation-harness task by name (Gao et al., the optional extra
``lit-align[lm-eval]``), skipped with a warning that says why when lm-eval is not installed or its data is not
reachable (offline).

``FewShotSST2`` in detail: k-shot sentiment classification of the SST-2 validation sentences (GLUE; Socher et al.
2013), by comparing the next-token log-probabilities of the two label words after a fixed prompt of ``shots`` labelled
training sentences (in-context learning as in Brown et al. 2020, *Language Models are Few-Shot Learners*,
scored as a two-way choice).
"""

from __future__ import annotations

import gzip
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch import nn

from lit_align.intervals import Estimate, wilson_interval

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SST2 = SHARED_DATA / "sst2"
DEFAULT_MULTI30K = SHARED_DATA / "multi30k"


class Task:
    """A task score (see the module docstring): ``statistics`` add up over ranks, ``value`` turns their sums into
    the score (NaN: nothing was scored), ``estimate`` gives the score with a 95 % interval in one process."""

    name = "task"

    def statistics(self, model: nn.Module, tokenizer, rank: int = 0, world_size: int = 1) -> list[float]:
        raise NotImplementedError

    def value(self, totals: Sequence[float]) -> float:
        raise NotImplementedError

    def estimate(self, model: nn.Module, tokenizer) -> Estimate:
        raise NotImplementedError


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class FewShotSST2(Task):
    """Few-shot SST-2 accuracy.

    Args:
        data_dir: a directory with GLUE's ``train.tsv(.gz)`` and ``dev.tsv(.gz)`` (``sentence``, ``label`` columns).
        shots: labelled training sentences in the prompt, balanced between the labels, drawn with ``seed``. The
            embedded SmolLM2-135M-Instruct scored 75 / 52 / 71 / 83 % of 100 dev sentences with 0 / 4 / 8 / 16
            shots (4 and 8 shots pulled it toward "positive": 98 and 81 % of its answers), so 16 is the default.
        examples: validation sentences scored (the first ``examples`` of a ``seed``-shuffled dev set; all when None).
        labels: the words for label 0 and label 1; each must be one token after a space for the tokenizer used.
    """

    name = "sst2_accuracy"

    def __init__(
        self,
        data_dir: str = str(DEFAULT_SST2),
        shots: int = 16,
        examples: int | None = 200,
        seed: int = 0,
        labels: tuple[str, str] = ("negative", "positive"),
    ) -> None:
        if shots < 0 or shots % 2:
            raise ValueError(f"FewShotSST2: shots must be an even number >= 0 (balanced labels), got {shots}")
        if examples is not None and examples < 1:
            raise ValueError(f"FewShotSST2: examples must be >= 1 (or None: all), got {examples}")
        self.data_dir, self.shots, self.examples, self.seed, self.labels = Path(data_dir), shots, examples, seed, labels
        self._rows: tuple[list[tuple[str, int]], str] | None = None

    def split(self, name: str) -> list[tuple[str, int]]:
        """``(sentence, label)`` rows of ``train`` or ``dev``, read with ``datasets`` (a missing file names itself)."""
        import datasets

        files = [self.data_dir / f"{name}.tsv.gz", self.data_dir / f"{name}.tsv"]
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"FewShotSST2: neither {files[0]} nor {files[1]} exists (data_dir={self.data_dir})")
        table = datasets.load_dataset("csv", data_files=str(path), delimiter="\t", split="train", quoting=3)
        missing = {"sentence", "label"} - set(table.column_names)
        if missing:
            raise ValueError(f"FewShotSST2: {path} lacks the column(s) {sorted(missing)}; found {table.column_names}")
        return [(str(s).strip(), int(label)) for s, label in zip(table["sentence"], table["label"], strict=True)]

    def prompt_and_examples(self) -> tuple[list[tuple[str, int]], str]:
        """The scored ``(sentence, label)`` rows and the few-shot prefix every one of them is appended to."""
        if self._rows is None:
            generator = random.Random(self.seed)
            train = self.split("train")
            shots = []
            for label in (0, 1):
                pool = [row for row in train if row[1] == label]
                shots += generator.sample(pool, self.shots // 2)
            generator.shuffle(shots)
            prefix = "".join(f"Review: {s}\nSentiment: {self.labels[label]}\n\n" for s, label in shots)
            dev = self.split("dev")
            generator.shuffle(dev)
            self._rows = (dev[: self.examples] if self.examples else dev, prefix)
        return self._rows

    def label_token_ids(self, tokenizer) -> list[int]:
        ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in self.labels]
        if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
            raise ValueError(f"FewShotSST2: labels {self.labels} must each be one distinct token after a space")
        return [i[0] for i in ids]

    @torch.no_grad()
    def score(self, model: nn.Module, tokenizer, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
        """(correct, scored) over this rank's share of the examples: the label word with the higher next-token
        log-probability after ``prefix + "Review: <sentence>\\nSentiment:"`` is the prediction."""
        rows, prefix = self.prompt_and_examples()
        label_ids = self.label_token_ids(tokenizer)
        device = next(model.parameters()).device
        correct = total = 0
        for sentence, label in rows[rank::world_size]:
            ids = tokenizer(prefix + f"Review: {sentence}\nSentiment:", return_tensors="pt")["input_ids"].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, -1]
            prediction = int(logits[label_ids[1]] > logits[label_ids[0]])
            correct += int(prediction == label)
            total += 1
        return correct, total

    def statistics(self, model: nn.Module, tokenizer, rank: int = 0, world_size: int = 1) -> list[float]:
        return [float(count) for count in self.score(model, tokenizer, rank, world_size)]

    def value(self, totals: Sequence[float]) -> float:
        correct, total = totals
        return correct / total if total else math.nan

    def estimate(self, model: nn.Module, tokenizer) -> Estimate:
        return wilson_interval(*self.score(model, tokenizer))


class Multi30kBLEU(Task):
    """Few-shot translation of Multi30k validation sentences, scored by sacrebleu corpus BLEU.

    The prompt is ``shots`` pairs ``"<Source>: x\n<Target>: y\n\n"`` from the train split (drawn with ``seed``),
    then ``"<Source>: x\n<Target>:"``; the model's greedy continuation up to its first newline is the translation.
    Statistics are sacrebleu's n-gram matches and totals and the two lengths, which add up over ranks, so the
    summed BLEU equals ``sacrebleu.corpus_bleu`` of every example (default 13a tokenisation, exp smoothing).

    Args:
        data_dir: line-aligned ``<split>.<lang>(.gz)`` files (``../shared/data/multi30k``).
        source, target: language codes of the files (``en``, ``fr``, ``de``).
        shots: example pairs in the prompt.
        examples: validation sentences translated (the first of a ``seed``-shuffled split).
        max_new_tokens: the longest translation generated.
        batch_size: sentences generated at a time (left-padded).
    """

    LANGUAGES = {"en": "English", "fr": "French", "de": "German", "cs": "Czech"}

    def __init__(
        self,
        data_dir: str = str(DEFAULT_MULTI30K),
        source: str = "en",
        target: str = "fr",
        shots: int = 4,
        examples: int | None = 100,
        max_new_tokens: int = 48,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        for code in (source, target):
            if code not in self.LANGUAGES:
                raise ValueError(f"Multi30kBLEU: language {code!r} is not one of {sorted(self.LANGUAGES)}")
        if shots < 0 or (examples is not None and examples < 1) or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("Multi30kBLEU: need shots >= 0, examples >= 1, max_new_tokens >= 1, batch_size >= 1")
        self.data_dir, self.source, self.target = Path(data_dir), source, target
        self.shots, self.examples, self.max_new_tokens = shots, examples, max_new_tokens
        self.batch_size, self.seed = batch_size, seed
        self.name = f"multi30k_bleu_{source}_{target}"
        self._rows: tuple[list[tuple[str, str]], str] | None = None

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """Line-aligned ``(source, target)`` sentences of ``split``."""
        texts = []
        for code in (self.source, self.target):
            files = [self.data_dir / f"{split}.{code}.gz", self.data_dir / f"{split}.{code}"]
            path = next((f for f in files if f.is_file()), None)
            if path is None:
                raise FileNotFoundError(f"Multi30kBLEU: neither {files[0]} nor {files[1]} exists")
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as file:
                texts.append([line.strip() for line in file])
        if len(texts[0]) != len(texts[1]):
            raise ValueError(f"Multi30kBLEU: {split}.{self.source} and {split}.{self.target} differ in line count")
        return [(a, b) for a, b in zip(*texts, strict=True) if a and b]

    def prompt_and_examples(self) -> tuple[list[tuple[str, str]], str]:
        if self._rows is None:
            generator = random.Random(self.seed)
            names = self.LANGUAGES[self.source], self.LANGUAGES[self.target]
            shots = generator.sample(self.pairs("train"), self.shots)
            prefix = "".join(f"{names[0]}: {a}\n{names[1]}: {b}\n\n" for a, b in shots)
            rows = self.pairs("val")
            generator.shuffle(rows)
            self._rows = (rows[: self.examples] if self.examples else rows, prefix)
        return self._rows

    @torch.no_grad()
    def translations(self, model: nn.Module, tokenizer, rows: list[tuple[str, str]]) -> list[str]:
        """Greedy few-shot translations of ``rows``' source sentences, each cut at its first newline."""
        _, prefix = self.prompt_and_examples()
        names = self.LANGUAGES[self.source], self.LANGUAGES[self.target]
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        outputs = []
        try:
            for start in range(0, len(rows), self.batch_size):
                prompts = [f"{prefix}{names[0]}: {a}\n{names[1]}:" for a, _ in rows[start : start + self.batch_size]]
                batch = tokenizer(prompts, return_tensors="pt", padding=True).to(_device(model))
                generated = model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
                texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
                outputs += [text.strip().split("\n", 1)[0].strip() for text in texts]
        finally:
            tokenizer.padding_side = side
        return outputs

    def statistics(self, model: nn.Module, tokenizer, rank: int = 0, world_size: int = 1) -> list[float]:
        from sacrebleu.metrics import BLEU

        rows, _ = self.prompt_and_examples()
        share = rows[rank::world_size]
        if not share:
            return [0.0] * 10
        score = BLEU().corpus_score(self.translations(model, tokenizer, share), [[b for _, b in share]])
        return [float(x) for x in (*score.counts, *score.totals, score.sys_len, score.ref_len)]

    def value(self, totals: Sequence[float]) -> float:
        from sacrebleu.metrics import BLEU

        counts, sums, sys_len, ref_len = totals[:4], totals[4:8], totals[8], totals[9]
        if sys_len == 0:
            return math.nan
        return BLEU.compute_bleu([int(c) for c in counts], [int(t) for t in sums], int(sys_len), int(ref_len),
                                 smooth_method="exp").score  # fmt: skip

    def estimate(self, model: nn.Module, tokenizer) -> Estimate:
        from lit_align.evaluate import bleu_estimate

        rows, _ = self.prompt_and_examples()
        return bleu_estimate(self.translations(model, tokenizer, rows), [b for _, b in rows])


class HeldoutPerplexity(Task):
    """Perplexity exp(Σ NLL / Σ tokens) of held-out human text: ``texts`` of a DataModule's ``heldout_texts``
    (e.g. ``datamodules.IMDBDataModule`` with a ``holdout``: real reviews never trained on) or lines of a file.

    Args:
        data: a DataModule with ``heldout_texts(n)``; or
        file: a text file, one text per line.
        texts: how many texts (the first ``texts``).
        name: the logged name (``eval_tax/<name>``).
    """

    def __init__(
        self,
        data: LightningDataModule | None = None,
        file: str | None = None,
        texts: int = 128,
        name: str = "heldout_perplexity",
    ) -> None:
        if (data is None) == (file is None):
            raise ValueError("HeldoutPerplexity: give exactly one of data (a DataModule) or file")
        if data is not None and not hasattr(data, "heldout_texts"):
            raise ValueError(f"HeldoutPerplexity: {type(data).__name__} has no heldout_texts")
        if texts < 1:
            raise ValueError(f"HeldoutPerplexity: texts must be >= 1, got {texts}")
        self.data, self.file, self.count, self.name = data, file, texts, name
        self._texts: list[str] | None = None

    def texts(self) -> list[str]:
        if self._texts is None:
            if self.data is not None:
                self._texts = self.data.heldout_texts(self.count)
            else:
                lines = Path(self.file).read_text(encoding="utf-8").splitlines()
                self._texts = [line for line in lines if line.strip()][: self.count]
            if not self._texts:
                raise ValueError(f"HeldoutPerplexity: no texts in {self.file or type(self.data).__name__}")
        return self._texts

    def statistics(self, model: nn.Module, tokenizer, rank: int = 0, world_size: int = 1) -> list[float]:
        from lit_align.evaluate import text_nll

        share = self.texts()[rank::world_size]
        sums, counts = text_nll(model, tokenizer, share) if share else ([], [])
        return [float(sum(sums)), float(sum(counts))]

    def value(self, totals: Sequence[float]) -> float:
        nll, tokens = totals
        return math.exp(nll / tokens) if tokens else math.nan

    def estimate(self, model: nn.Module, tokenizer) -> Estimate:
        from lit_align.evaluate import perplexity_estimate, text_nll

        return perplexity_estimate(*text_nll(model, tokenizer, self.texts()))


class LMEvalTask(Task):
    """An lm-evaluation-harness task by name (e.g. ``hellaswag``, ``arc_easy``), on rank 0 with the policy in
    memory (lm-eval's ``HFLM`` wrapper), the first ``limit`` examples; the score is ``metric`` (default ``acc``).

    Skipped, with one warning that says why, when lm-eval is not installed (``pip install 'lit-align[lm-eval]'``)
    or the task or its data cannot be loaded (offline); a skipped task logs nothing and ``evaluate`` reports NaN.
    """

    def __init__(self, task: str, limit: int | None = 100, num_fewshot: int | None = None, metric: str = "acc",
                 batch_size: int = 8) -> None:  # fmt: skip
        self.task, self.limit, self.num_fewshot, self.metric = task, limit, num_fewshot, metric
        self.batch_size = batch_size
        self.name = f"lm_eval_{task}"
        self.skipped: str | None = None

    def skip(self, reason: str) -> list[float]:
        if self.skipped is None:
            self.skipped = reason
            warnings.warn(f"LMEvalTask {self.task!r} skipped: {reason}", stacklevel=3)
        return [0.0, 0.0]

    def run(self, model: nn.Module, tokenizer) -> tuple[float, int] | None:
        """(score, examples) from lm-eval, or None when skipped."""
        if self.skipped is not None:
            return None
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
        except ImportError:
            self.skip("lm-eval is not installed (pip install 'lit-align[lm-eval]')")
            return None
        try:
            results = lm_eval.simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size),
                tasks=[self.task],
                limit=self.limit,
                num_fewshot=self.num_fewshot,
            )
            score = float(results["results"][self.task][f"{self.metric},none"])
            examples = int(results["n-samples"][self.task]["effective"])
        except Exception as err:  # lm-eval raises many types for a task or dataset it cannot load
            self.skip(f"lm-eval could not run it ({type(err).__name__}: {err})")
            return None
        return score, examples

    def statistics(self, model: nn.Module, tokenizer, rank: int = 0, world_size: int = 1) -> list[float]:
        if rank != 0:
            return [0.0, 0.0]
        result = self.run(model, tokenizer)
        return [0.0, 0.0] if result is None else [result[0] * result[1], float(result[1])]

    def value(self, totals: Sequence[float]) -> float:
        weighted, examples = totals
        return weighted / examples if examples else math.nan

    def estimate(self, model: nn.Module, tokenizer) -> Estimate:
        result = self.run(model, tokenizer)
        if result is None:
            return Estimate(math.nan, math.nan, math.nan, 0)
        score, examples = result
        if self.metric.startswith("acc"):
            return wilson_interval(round(score * examples), examples)
        return Estimate(score, math.nan, math.nan, examples)
