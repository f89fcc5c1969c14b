"""Task scores: the alignment tax measured on a task the policy should keep doing, not only as KL or perplexity.

The seed papers measure the tax on tasks — Lin et al. 2024 (*Mitigating the Alignment Tax of RLHF*) on reading
comprehension and common-sense benchmarks, Lu et al. 2024 (*Online Merging Optimizers*) on a suite of LM tasks. A
task here is an object with a ``name`` and ``score(model, tokenizer, rank, world_size) -> (correct, total)``: each
rank scores its share of the examples and the caller sums the counts (``callbacks.TaskScore`` during validation,
exact under DDP; ``lit-align evaluate`` in one process, with a Wilson interval).

``FewShotSST2``: k-shot sentiment classification of the SST-2 validation sentences (GLUE; Socher et al. 2013), by
comparing the next-token log-probabilities of the two label words after a fixed prompt of ``shots`` labelled
training sentences (in-context learning as in Brown et al. 2020, *Language Models are Few-Shot Learners*,
scored as a two-way choice).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

DEFAULT_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


class FewShotSST2:
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
