"""Memory and time of a training run, estimated before it starts — a rough guide, shown as such, never a promise.

Owns: the time arithmetic below and its assumptions, and the one measurement it makes (this machine's float32 matmul
speed, once per board). Memory is train/memory.py's pre-flight estimate — the same figure `lmforge train` checks
before it loads weights — with a fixed allowance for the training process itself in place of the board's own size.
Must not load a model (parameters are counted on an empty meta-device copy and from the safetensors headers).

Assumptions:
- Tokens per micro-batch: batch_size × tokens per example, which is cutoff_len unless the page knows the dataset's
  mean length from `data inspect` (packed rows hold real lengths, not cutoff_len).
- Time: a token costs 2 FLOPs per matmul weight forward and 2 backward for the activations' gradients, +2 for the
  weights' gradients when the whole model trains (full, freeze); at EFFICIENCY × the float32 matmul speed measured
  on this machine. When a run in the workspace trained the same model with the same method, its logged tokens/s is
  used instead (a measurement beats a model of one). Model loading, data preparation and evaluation are left out.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import Config
from ..train.memory import count_parameters as count_trainable
from ..train.memory import estimate_peak

EFFICIENCY = 0.5  # share of the measured matmul speed a training step reaches (benchmarks/RESULTS.md, lora)
RUNTIME_BYTES = 450 * 2**20  # a training process before its model loads: interpreter, torch, tokenizer, data
MIB = 2**20
_speed: dict[str, float] = {}
_speed_lock = threading.Lock()


def matmul_flops_per_second() -> float:
    """This machine's float32 matmul speed (FLOP/s) at the current torch thread count, measured once (~0.3 s)."""
    with _speed_lock:
        if "flops" not in _speed:
            a, b = torch.randn(512, 576), torch.randn(576, 1536)
            for _ in range(3):
                a @ b
            start, count = time.perf_counter(), 0
            while time.perf_counter() - start < 0.3:
                a @ b
                count += 1
            _speed["flops"] = count * 2 * 512 * 576 * 1536 / (time.perf_counter() - start)
        return _speed["flops"]


def count_parameters(model_dir: Path) -> dict:
    """Parameters from the safetensors headers: total and those in the embedding (no matmul per token)."""
    total = embedding = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(info["shape"])
            total += count
            if "embed_tokens" in name or "wte" in name:
                embedding += count
    return {"total": total, "embedding": embedding}


def estimate(model_dir: str | Path, config: Config, tokens_per_example: float | None = None,
             measured_tokens_per_s: float | None = None) -> dict:
    model_dir = Path(model_dir)
    train, cutoff = config.train, config.data.cutoff_len
    per_example = min(float(tokens_per_example or cutoff), cutoff)
    tokens = max(1, round(train.batch_size * per_example))
    memory = replace(estimate_peak(config, str(model_dir), tokens,
                                   needs_reference_copy=train.stage in ("dpo", "kto") and
                                   config.method.type in ("full", "freeze")),
                     process=RUNTIME_BYTES)
    _, trainable, _ = count_trainable(str(model_dir), config.method, config.model.dtype)
    params = count_parameters(model_dir)
    matmul_params = max(params["total"] - params["embedding"], 1)
    step_tokens = tokens * train.gradient_accumulation_steps
    if measured_tokens_per_s:
        speed, source = measured_tokens_per_s, "measured"
    else:
        flops_per_token = (6 if config.method.type in ("full", "freeze") else 4) * matmul_params
        speed, source = EFFICIENCY * matmul_flops_per_second() / flops_per_token, "model"
    return {"parameters": params["total"], "trainable_parameters": int(trainable),
            "memory_mib": {"weights": round(memory.weights / MIB), "optimizer": round(memory.training_state / MIB),
                           "activations": round((memory.activations + memory.head) / MIB),
                           "reference": round(memory.reference / MIB), "runtime": round(memory.process / MIB),
                           "peak": round(memory.peak / MIB)},
            "tokens_per_step": step_tokens, "tokens_per_s": round(speed, 1), "speed_source": source,
            "seconds_per_step": round(step_tokens / speed, 3)}


def with_steps(result: dict, steps: int | None) -> dict:
    """Add the total time for `steps` optimizer steps (None when the step count needs the data)."""
    return {**result, "steps": steps,
            "seconds": round(steps * result["seconds_per_step"], 2) if steps else None}
