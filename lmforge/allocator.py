"""Which C memory allocator the process runs on: jemalloc where the system has it, glibc's malloc otherwise.

A training step on the CPU allocates and frees hundreds of activation tensors of a few MB each. glibc's malloc hands
such blocks back to the kernel (large blocks are mmap'd; lmforge's heap trims return the rest, train/heap.py), and
every reuse then faults its pages in again: ~250,000 page faults and ~20 % system time per step on the bundled model.
jemalloc keeps freed pages in its own size classes and returns them lazily, so the same step needs less CPU and a
lower peak RSS (benchmarks/RESULTS.md). The allocator can only be chosen before the process starts, so the CLI
re-executes itself once with jemalloc preloaded (`reexec_with_jemalloc`); `LMFORGE_ALLOCATOR=system` keeps glibc.
Child processes (torchrun workers, board jobs) inherit the environment and so the allocator.

Also the bound on oneDNN's kernel caches (`bound_kernel_caches`). Under bf16 on the CPU every matmul runs through
oneDNN, which keeps the kernel it built for each matmul shape in two caches: its own primitive cache and PyTorch's
(ideep's) computation cache, 1,024 entries each by default, ~0.25 MB an entry. A packed training row has a new
length nearly every step and so brings ~25 new shapes, which the caches keep: the demo's training process grew by
~750 MB over 60 steps. A step uses ~25 kernels, a decoding step ~5 per batch size, so 128 entries hold several
steps' worth and the caches stop at ~60 MB. oneDNN reads both variables when it first builds a kernel, so they are
set before any matmul runs; a value the user set is kept.

Must not import torch or anything heavy: it runs before the verb's own imports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_CHOICE = "LMFORGE_ALLOCATOR"  # "system" keeps glibc malloc; anything else (or unset): jemalloc when found
ENV_DONE = "LMFORGE_ALLOCATOR_EXEC"  # set on the re-executed process so it never re-executes again
SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
          "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
LIBRARY = "libjemalloc.so.2"  # jemalloc with its default settings (MALLOC_CONF, if the user sets one, is kept)


KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's; PyTorch's (ideep)
KERNEL_CACHE_CAPACITY = "128"  # entries per cache: a few steps' kernels, not every shape ever seen (RESULTS.md)


def bound_kernel_caches(environ=os.environ) -> None:
    """Cap oneDNN's per-shape kernel caches at KERNEL_CACHE_CAPACITY entries in `environ`, unless already set."""
    for name in KERNEL_CACHE_VARIABLES:
        environ.setdefault(name, KERNEL_CACHE_CAPACITY)


def find_jemalloc() -> str | None:
    """The path of libjemalloc.so.2 on this system (Debian / Ubuntu package libjemalloc2), or None."""
    if not sys.platform.startswith("linux"):
        return None
    for folder in SEARCH:
        path = Path(folder) / LIBRARY
        if path.is_file():
            return str(path)
    return None


def jemalloc_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """True when jemalloc is this process's allocator (mapped into it: preloaded or linked)."""
    try:
        return "libjemalloc" in maps.read_text(errors="replace")
    except OSError:
        return False


def wants_jemalloc(environ=os.environ) -> bool:
    return environ.get(ENV_CHOICE, "").strip().lower() not in ("system", "glibc", "malloc", "0", "off")


def environment_with_jemalloc(environ=os.environ, library: str | None = None) -> dict[str, str] | None:
    """`environ` plus what preloads jemalloc in a new process; None when jemalloc is absent or switched off."""
    library = library or find_jemalloc()
    if library is None or not wants_jemalloc(environ):
        return None
    env = dict(environ)
    preload = [item for item in env.get("LD_PRELOAD", "").replace(":", " ").split() if item]
    if library not in preload:
        env["LD_PRELOAD"] = " ".join([library, *preload])
    env[ENV_DONE] = "1"
    return env


def reexec_with_jemalloc(argv: list[str]) -> None:
    """Replace this process by `python -m lmforge argv` with jemalloc preloaded (same PID, stdin/stdout, signals).
    Returns without doing anything where that is not wanted or possible: already re-executed or loaded, switched off,
    not found, or not Linux."""
    if os.environ.get(ENV_DONE) or jemalloc_loaded():
        return
    env = environment_with_jemalloc()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "lmforge", *argv], env)
    except OSError:  # cannot exec (seccomp, odd interpreter): keep running on glibc
        return


def describe() -> str:
    """One line for the run's log: which allocator this process runs on, and how to change it."""
    if jemalloc_loaded():
        return f"memory allocator: jemalloc (set {ENV_CHOICE}=system for glibc malloc)"
    if not wants_jemalloc():
        return f"memory allocator: glibc malloc ({ENV_CHOICE}=system)"
    if find_jemalloc() is None and sys.platform.startswith("linux"):
        return ("memory allocator: glibc malloc — jemalloc not found; installing it (Debian / Ubuntu: "
                "apt install libjemalloc2) makes CPU training steps cheaper (benchmarks/RESULTS.md)")
    return "memory allocator: glibc malloc"
