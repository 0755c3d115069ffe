"""Give freed heap memory back to the OS inside a training step (glibc malloc_trim at decoder-layer boundaries).

glibc serves the many same-sized activation tensors of a step from its heap and keeps the pages of freed ones,
so RSS grows far past what is alive (3.85 GB peak vs 2.6 GB on a 2,048-token LoRA step of SmolLM2). Trimming
after each decoder layer's forward and before its backward releases them at no measurable speed cost
(benchmarks/RESULTS.md).
A no-op where glibc is absent. Must not change any computed value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import warnings
from functools import lru_cache

# The first decoder layer's inputs never need gradients (the embeddings are frozen); torch warns about that once
# per backward hook, but the hook only trims memory and does not depend on input gradients.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs since no inputs require gradients")


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def _trim(*_) -> None:
    _malloc_trim()(0)  # returns 1/0; the hook must return None so it changes nothing


def trim_heap_between_layers(model) -> bool:
    """Register the trims on every decoder layer; return False where the C library has no malloc_trim."""
    if _malloc_trim() is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        layer.register_forward_hook(_trim)
        layer.register_full_backward_pre_hook(_trim)
    return True
