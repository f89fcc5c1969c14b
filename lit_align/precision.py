"""The fastest precision that keeps results: bf16 mixed precision where the hardware multiplies bf16 natively.

bf16 *mixed* precision (Lightning's ``bf16-mixed``: fp32 weights and optimizer state, matmuls under bf16 autocast)
reproduces fp32 training within noise (tests/test_precision.py) and is 2–4× faster where bf16 matrix units exist:
CUDA GPUs from Ampere on, CPUs with AMX or AVX512-BF16 (benchmarks/peak.py measures the ratio). Where they do not,
bf16 is emulated and far *slower* than fp32 (≈150× for a matmul on an AVX2-only CPU), so the choice depends on the
machine: ``fastest_precision`` makes it, and ``lit-align`` applies it for ``--trainer.precision auto``.
"""

from __future__ import annotations

from pathlib import Path

import torch

AUTO = "auto"
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the bf16 matrix instructions


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set(cpuinfo.read_text(errors="replace").split())
        return any(flag in flags for flag in CPU_BF16_FLAGS)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own checks, where /proc is absent
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def fastest_precision(accelerator: str = "auto") -> str:
    """``"bf16-mixed"`` where ``accelerator`` ("auto", "cpu", "gpu"/"cuda") multiplies bf16 natively, else
    ``"32-true"``. ``auto`` means a CUDA GPU when one is visible, else the CPU (Lightning's rule)."""
    name = str(accelerator).lower()
    if name in ("gpu", "cuda") or (name == AUTO and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    if name in ("cpu", AUTO):
        return "bf16-mixed" if cpu_has_bf16_matmul() else "32-true"
    return "32-true"  # mps, tpu, …: not measured here
