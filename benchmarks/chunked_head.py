"""The chunked output layer + log-prob vs Hugging Face's full logits: step time and peak memory of one
``sequence_logprobs`` forward + backward on the embedded SmolLM2-135M (49k vocabulary), each setting in its own
process.

    python benchmarks/chunked_head.py [--lengths 256 1024] [--rows 8] [--chunk 1024]

Rows of random tokens, the completion = the second half of each row (the log-probs of half the positions are
needed, as in DPO). Reported per (length, chunk): seconds per step (median of ``--steps`` after one warm-up step)
and the process's peak RSS after the steps (``resource.getrusage``, includes the model, its gradients and Python).
fp32, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one_setting(length: int, rows: int, chunk: int | None, steps: int) -> dict:
    import torch

    from lit_align.logprobs import sequence_logprobs
    from lit_align.models import EMBEDDED_MODEL, load_causal_lm

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_causal_lm(EMBEDDED_MODEL, "float32", 0)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, length // 2 :] = 1
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        out = sequence_logprobs(model, ids, attention, completion, chunk)
        out.logps.sum().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {
        "length": length,
        "chunk": chunk,
        "step_s": statistics.median(times[1:]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "chunked_head.json"))
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        length, chunk = int(args.one[0]), None if args.one[1] == "none" else int(args.one[1])
        print(json.dumps(one_setting(length, args.rows, chunk, args.steps)))
        return
    results = []
    for length in args.lengths:
        for chunk in ("none", str(args.chunk)):
            command = [sys.executable, __file__, "--one", str(length), chunk, "--rows", str(args.rows)]
            output = subprocess.run([*command, "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    Path(args.out).write_text(json.dumps({"rows": args.rows, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
