"""Memory and time of a DPO step against sequence length: full logits vs the chunked output layer, with and without
gradient checkpointing, on the embedded SmolLM2-135M (49k vocabulary), each setting in its own process.

    python benchmarks/chunked_head.py [--lengths 128 256 512 1024 2048] [--pairs 4] [--chunk 1024] \\
        [--modes plain chunk checkpointing chunk+checkpointing] [--precision bf16-mixed]

A synthetic DPO step on random tokens: ``--pairs`` chosen and as many rejected rows of ``length`` tokens whose
second half is the completion; the policy's ``sequence_logprobs`` forward with gradient, the frozen reference's
forward without, the sigmoid DPO loss, backward and an AdamW step (the optimizer state is part of the memory).
Reported per (length, mode): seconds per step (median of ``--steps`` after one warm-up step) and the process's peak
RSS (``resource.getrusage``: model, reference, gradients, AdamW state, activations and Python). 2 threads;
``--precision bf16-mixed`` runs the forwards under bf16 autocast over fp32 weights (Lightning's bf16-mixed).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import peak_rss_gb

MODES = ("plain", "chunk", "checkpointing", "chunk+checkpointing")


def one_setting(length: int, pairs: int, mode: str, chunk: int, precision: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lit_align.logprobs import sequence_logprobs
    from lit_align.models import EMBEDDED_MODEL, load_causal_lm

    torch.set_num_threads(2)
    torch.manual_seed(0)
    policy = load_causal_lm(EMBEDDED_MODEL, "float32", 0)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if "checkpointing" in mode:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    chunk_size = chunk if "chunk" in mode.split("+") else None
    ids = torch.randint(0, policy.config.vocab_size, (2 * pairs, length))
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, length // 2 :] = 1
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logps = sequence_logprobs(policy, ids, attention, completion, chunk_size).logps
            with torch.no_grad():
                ref = sequence_logprobs(reference, ids, attention, completion, chunk_size).logps
        chosen, rejected = (logps - ref).chunk(2)
        loss = -F.logsigmoid(0.1 * (chosen - rejected)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {
        "length": length,
        "mode": mode,
        "step_s": statistics.median(times[1:]),
        "peak_rss_gb": peak_rss_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "chunked_head.json"))
    parser.add_argument("--append", action="store_true", help="add to the results already in --out")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        length, mode = int(args.one[0]), args.one[1]
        print(json.dumps(one_setting(length, args.pairs, mode, args.chunk, args.precision, args.steps)))
        return
    settings = {"pairs": args.pairs, "chunk": args.chunk, "precision": args.precision}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.append and out.is_file() else {}
    results = previous.get("results", [])
    for length in args.lengths:
        for mode in args.modes:
            command = [sys.executable, __file__, "--one", str(length), mode, "--pairs", str(args.pairs)]
            command += ["--chunk", str(args.chunk), "--precision", args.precision, "--steps", str(args.steps)]
            output = subprocess.run(command, capture_output=True, text=True)
            if output.returncode == 0:
                results.append(json.loads(output.stdout.strip().splitlines()[-1]))
            else:  # e.g. killed for memory (-9): recorded, and the other settings still run
                results.append({"length": length, "mode": mode, "failed": output.returncode})
            print(results[-1], flush=True)
            out.write_text(json.dumps({**settings, "results": results}, indent=1) + "\n")  # after every setting


if __name__ == "__main__":
    main()
