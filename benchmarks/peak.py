"""The machine's measured matmul peak per dtype: the denominator of every benchmark's MFU.

    python benchmarks/peak.py [--threads 2] [--out benchmarks/results/peak.json]

For each dtype (float32, bfloat16, float16) and square sizes 1024–4096 (and the shapes of a SmolLM2-135M layer:
2048 tokens × 576 → 1536 and the 576 → 49152 output layer), times ``torch.mm`` after warm-up and reports GFLOP/s
(2·m·n·k per product). The peak of a dtype is the best over its shapes. A dtype the CPU has no instructions for is
emulated and slow: once one product takes longer than ``--seconds`` its larger shapes are skipped. The CPU's
matrix extensions (AMX, AVX512-BF16, ...) are recorded. CPU by default; ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

# ascending in work: a dtype whose product takes longer than --seconds is emulated, and its larger shapes are skipped
SHAPES = [(1024, 1024, 1024), (2048, 576, 1536), (2048, 2048, 2048), (2048, 576, 49152), (4096, 4096, 4096)]


def gflops(m: int, k: int, n: int, dtype: torch.dtype, device: str, seconds: float) -> tuple[float, bool]:
    """GFLOP/s of ``torch.mm`` at this shape, and whether one product alone took longer than ``seconds``."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    started = time.perf_counter()
    torch.mm(a, b)
    if time.perf_counter() - started > seconds:  # a dtype this hardware emulates slowly: one product is enough
        return 2 * m * k * n / (time.perf_counter() - started) / 1e9, True
    torch.mm(a, b)
    done, runs, started = False, 0, time.perf_counter()
    while not done:
        torch.mm(a, b)
        runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter() - started > seconds and runs >= 3
    return 2 * m * k * n * runs / (time.perf_counter() - started) / 1e9, False


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's bf16/fp16 matrix and vector extensions (AMX, AVX512-BF16/FP16) and AVX2/AVX512F."""
    if not Path("/proc/cpuinfo").exists():
        return []
    flags = set(Path("/proc/cpuinfo").read_text().split())
    wanted = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")
    return [flag for flag in wanted if flag in flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per shape")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "peak.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    results: dict = {
        "device": args.device,
        "cpu": cpu_name(),
        "cpu_matrix_flags": cpu_flags(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "gflops": {},
    }
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        per_shape = {}
        for m, k, n in SHAPES:
            rate, slow = gflops(m, k, n, dtype, args.device, args.seconds)
            per_shape[f"{m}x{k}x{n}"] = round(rate, 1)
            if slow:
                break
        results["gflops"][name] = {"peak": max(per_shape.values()), "shapes": per_shape}
        print(name, json.dumps(results["gflops"][name]), flush=True)
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
