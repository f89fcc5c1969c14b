"""Tokenization and collation: first run vs cached run, and per-rank work under 2-process DDP.

    python benchmarks/tokenization.py [--rows 200000] [--out benchmarks/results/tokenization.json]

Three measurements, each phase in a fresh process (no in-process state survives between a first and a cached run):

* **HH** — all local Anthropic HH test rows (helpful-base + harmless-base, ~2×2.3k pairs) through ``HHDataModule``.
* **synthetic** — a ``{prompt, chosen, rejected}`` JSONL file of ``--rows`` rows (default 200k) whose words are drawn
  from the HH dialogues (English text, HH-like lengths), through ``TRLFormatDataModule``.
  For both: *read + parse* (``setup``: read the files, validate every row, build the records), *tokenize* (first
  use of the train split: ``datasets.map`` on a cold cache, or loading the cache), and *collate* (iterating the
  train loader: batches of 8 pairs, the Arrow read and padding) per batch. The first run also times the floor: the
  tokenizer's batched calls on the same three text columns with nothing else (*bare tokenizer*).
* **DDP** — a 2-process (gloo) ``Trainer.fit`` of ``DPOModule`` on the tiny test model (one step) over the synthetic
  file with a cold cache: what each rank did for the train split (tokenized or loaded from the cache) and how long
  it took. Lightning runs ``prepare_data`` (which tokenizes) on rank 0 while rank 1 waits.

The tokenizer is the embedded SmolLM2's (49k vocabulary, fast tokenizer); max_length 512, max_prompt_length 256;
2 threads. The cache of each measurement is a fresh temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HH = "/work/shared/data/hh_rlhf"
SETTINGS = {"max_length": 512, "max_prompt_length": 256, "batch_size": 8}


def write_synthetic(path: Path, rows: int, seed: int = 0) -> None:
    """Preference rows of English words (the HH vocabulary), prompt 10–120 words, answers 5–150 words."""
    import datasets

    words: list[str] = []
    for subset in ("helpful-base", "harmless-base"):
        table = datasets.load_dataset("json", data_files=f"{HH}/{subset}/test.jsonl.gz", split="train")
        for text in table["chosen"][:1000]:
            words += text.replace("\n\nHuman:", " ").replace("\n\nAssistant:", " ").split()
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high)))

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            row = {
                "prompt": sentence(10, 120) + "?",
                "chosen": " " + sentence(5, 150),
                "rejected": " " + sentence(5, 150),
            }
            handle.write(json.dumps(row) + "\n")


def load_phase(data: str, path: str, cache: str, batches: int) -> dict:
    """One DataModule in this process: read + parse, tokenize (or load the cache), collate."""
    from datamodules import HHDataModule, TRLFormatDataModule
    from lit_align.models import EMBEDDED_MODEL, load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    common = {**SETTINGS, "cache_dir": cache, "val_split": None}
    if data == "hh":
        dm = HHDataModule(data_path=path, train_split="test", **common)
    else:
        dm = TRLFormatDataModule(data_path=path, **common)
    started = time.perf_counter()
    dm.attach(tokenizer, "pair").setup("fit")
    parsed = time.perf_counter()
    train = dm.dataset("train")
    tokenized = time.perf_counter()
    loader = iter(dm.dataloader("train", shuffle=True))
    widths = []
    for _ in range(batches):
        widths.append(next(loader)["chosen_input_ids"].shape[1])
    collated = time.perf_counter()
    bare = None
    if train.source == "tokenized":  # the floor: the tokenizer's batched calls alone, on the same texts
        records = train.records
        started_bare = time.perf_counter()
        for field in ("prompt", "chosen", "rejected"):
            tokenizer([r[field] for r in records], add_special_tokens=False)
        bare = time.perf_counter() - started_bare
    return {
        "bare_tokenizer_s": bare,
        "rows": len(train),
        "source": train.source,
        "read_parse_s": parsed - started,
        "tokenize_s": tokenized - parsed,
        "collate_ms_per_batch": 1000 * (collated - tokenized) / batches,
        "truncation": dm.truncation_stats["train"],
    }


def ddp_phase(path: str, cache: str, out: str) -> None:
    """2-process DDP fit, one DPO step; each rank writes what it did for the train split."""
    import lightning as L

    from datamodules import TRLFormatDataModule
    from lit_align import DPOModule

    dm = TRLFormatDataModule(data_path=path, val_split=None, cache_dir=cache, **SETTINGS)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(DPOModule(model="tiny-llama"), datamodule=dm)
    log = [entry for entry in dm.tokenization_log if entry[0] == "train"]
    with open(f"{out}.rank{trainer.global_rank}", "w") as handle:
        json.dump({"train": log, "fit_s": time.perf_counter() - started}, handle)


def run(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenization.json"))
    parser.add_argument("--phase", choices=["load", "ddp"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "load":
        print(json.dumps(load_phase(args.data, args.path, args.cache, args.batches)))
        return
    if args.phase == "ddp":
        ddp_phase(args.path, args.cache, args.result)
        return

    results: dict = {"settings": {**SETTINGS, "rows": args.rows, "threads": 2}, "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as work:
        synthetic = Path(work) / "synthetic.jsonl"
        write_synthetic(synthetic, args.rows)
        results["synthetic_file_mb"] = synthetic.stat().st_size / 1e6
        for name, path in (("hh", HH), ("synthetic", str(synthetic))):
            cache = tempfile.mkdtemp(dir=work)
            first = run(
                "--phase", "load", "--data", name, "--path", path, "--cache", cache, "--batches", str(args.batches)
            )
            cached = run(
                "--phase", "load", "--data", name, "--path", path, "--cache", cache, "--batches", str(args.batches)
            )
            assert (first["source"], cached["source"]) == ("tokenized", "cache")
            results[name] = {
                "first": first,
                "cached": cached,
                "tokenize_speedup": first["tokenize_s"] / cached["tokenize_s"],
            }
            print(f"{name}: {json.dumps(results[name], indent=1)}", flush=True)
        cache = tempfile.mkdtemp(dir=work)
        marker = str(Path(work) / "ddp")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        command = [sys.executable, __file__, "--phase", "ddp", "--path", str(synthetic), "--cache", cache]
        subprocess.run([*command, "--result", marker], env=env, check=True, capture_output=True)
        results["ddp"] = {f"rank{r}": json.loads(Path(f"{marker}.rank{r}").read_text()) for r in (0, 1)}
        print(f"ddp: {json.dumps(results['ddp'], indent=1)}", flush=True)
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
