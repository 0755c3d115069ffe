"""Give freed heap memory back to the OS inside a training step (glibc malloc_trim at decoder-layer boundaries).

glibc serves the many same-sized activation tensors of a step from its heap and keeps the pages of freed ones,
so RSS grows far past what is alive (3.85 GB peak vs 2.6 GB on a 2,048-token LoRA step of SmolLM2). Trimming after
every 4th decoder layer's forward caps the peak; trimming every layer in both directions costs ~25 % speed in page
faults (benchmarks/RESULTS.md).
A no-op where glibc is absent, and under jemalloc (lmforge/allocator.py), which keeps freed pages in its own size
classes and returns them lazily: there the trims would only cost. Must not change any computed value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

from ..allocator import jemalloc_loaded
from ..model.methods import unwrap

EVERY_N_LAYERS = 4  # trimming costs page faults when the memory is reused: often enough to cap the peak, no more


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def _trim(*_) -> None:
    _malloc_trim()(0)  # its 1/0 result is dropped: a forward hook returning a value would replace the output


def trim_heap_between_layers(model) -> bool:
    """Trim after every EVERY_N_LAYERS-th decoder layer's forward; False where the C library has no malloc_trim or
    jemalloc is the allocator."""
    if _malloc_trim() is None or jemalloc_loaded():
        return False
    for layer in unwrap(model).get_decoder().layers[::EVERY_N_LAYERS]:
        layer.register_forward_hook(_trim)
    return True
