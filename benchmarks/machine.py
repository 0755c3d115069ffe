"""What machine a benchmark ran on, recorded beside its figures: CPU model, the flags that decide precision (avx2,
avx512f, avx512_bf16, amx_bf16, avx512_fp16), cores, load, this process's memory allocator and oneDNN kernel-cache
bounds, versions — and a GEMM probe of each precision taken in the same run, the yardstick for "useful GFLOP/s".
Figures from different CPUs are never comparable; RESULTS.md keeps one section per CPU. Measures; changes nothing.
"""

from __future__ import annotations

import os
import platform

from lmforge.allocator import KERNEL_CACHE_VARIABLES, jemalloc_loaded
from lmforge.model.precision import REPORTED_FLAGS, cpu_capability, gemm_gflops


def machine_info() -> dict:
    """CPU model + flags, cores, OS, load average at the time of the call (call it at the start and the end)."""
    capability = cpu_capability()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": capability.model, "flags": [flag for flag in REPORTED_FLAGS if flag in capability.flags],
            "bf16_native": bool(capability.bf16_instructions), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "os": platform.platform(), "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "allocator": "jemalloc" if jemalloc_loaded() else "glibc malloc",
            "kernel_caches": {name: os.environ.get(name, "unset (1024)") for name in KERNEL_CACHE_VARIABLES}}


def machine_line(info: dict) -> str:
    """One line for a Markdown report: `CPU (flags), N logical CPUs (M usable), load average …`."""
    flags = ", ".join(info["flags"]) or "none of " + ", ".join(REPORTED_FLAGS)
    return (f"{info['cpu']} (flags: {flags}), {info['logical_cpus']} logical CPUs ({info['usable_cpus']} usable), "
            f"load average (1/5/15 min) {info['load_average']}, allocator {info.get('allocator', 'n/a')}"
            + (f", this process's oneDNN kernel caches {info['kernel_caches']}" if "kernel_caches" in info else ""))


def gemm_probe(tokens: int, inputs: int, outputs: int, seconds: float = 0.5) -> dict:
    """GFLOP/s of one matmul shape in fp32 and bf16 (the best of repeats over ~`seconds` each), in this process with
    its torch thread count: the ceiling a training step's useful GFLOP/s is compared with."""
    import torch

    return {"shape": [tokens, inputs, outputs], "threads": torch.get_num_threads(),
            "fp32_gflops": round(gemm_gflops(tokens, inputs, outputs, torch.float32, seconds), 1),
            "bf16_gflops": round(gemm_gflops(tokens, inputs, outputs, torch.bfloat16, seconds), 1)}
