"""Memory and time of a training run, estimated before it starts — a rough guide, shown as such, never a promise.

Owns: the arithmetic below and its assumptions; the one measurement it makes (this machine's float32 matmul speed,
once per board). Must not load a model: parameter counts come from the safetensors headers and config.json.

Assumptions (CPU, float32, as lmforge trains on a CPU):
- Weights: 4 bytes per parameter; qlora keeps the decoder's linear weights in 4 bits (~0.56 bytes with scales) or
  8 bits (1 byte), everything else in float32.
- Trainable parameters: lora / dora / qlora: rank × (in + out) for every linear layer of every decoder layer
  (lora_target: all); loha twice that; lokr / ia3 / prompt methods: small (counted as 1 % of lora); adapter: two
  adapter_size-wide projections after attention and MLP per layer; freeze: the last N layers; full: everything.
  Each trainable parameter costs 16 bytes with its gradient and AdamW's two moments (weight, grad, m, v).
- Activations: packed rows hold batch_size × tokens per example tokens (cutoff_len unless the page knows the
  dataset's mean length from `data inspect`); per token and decoder layer ~16 hidden-size and 3 intermediate-size
  float32 tensors are kept for backward (the lean MLP keeps gate and up). The LM head runs on supervised rows in
  chunks, so its logits are left out. Plus ~400 MiB for Python, torch and the tokenizer.
- Time: a token costs 2 FLOPs per matmul weight forward and 2 backward for the activations' gradients, +2 for the
  weights' gradients when the whole model trains (full, freeze's layers); at EFFICIENCY × the float32 matmul speed
  measured on this machine. When a finished run in the workspace trained the same model with the same method, its
  logged tokens/s is used instead (a measurement beats a model of one). Model loading and evaluation are left out.
Compared with benchmarks/RESULTS.md (SmolLM2-135M, lora, batch 4): the estimate lands within ~1.5× of the
measured peak RSS and tokens/s; treat it as an order of magnitude.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from pathlib import Path

import torch

EFFICIENCY = 0.5  # share of the measured matmul speed a training step reaches (benchmarks/RESULTS.md, lora)
RUNTIME_BYTES = 400 * 2**20
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


def estimate(model_dir: str | Path, config: dict, tokens_per_example: float | None = None,
             measured_tokens_per_s: float | None = None) -> dict:
    """`config` is a run config as a dict (sections method / data / train)."""
    model_dir = Path(model_dir)
    arch = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = arch.get("text_config", arch)
    hidden, layers = arch["hidden_size"], arch["num_hidden_layers"]
    inter = arch.get("intermediate_size", 4 * hidden)
    heads = arch.get("num_attention_heads", 1)
    kv = hidden * arch.get("num_key_value_heads", heads) // heads
    params = count_parameters(model_dir)
    matmul_params = max(params["total"] - params["embedding"], 1)
    method, data, train = config.get("method", {}), config.get("data", {}), config.get("train", {})
    kind = method.get("type", "lora")

    linear_in_out = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter),
                     (hidden, inter), (inter, hidden)]
    lora = layers * method.get("lora_rank", 8) * sum(a + b for a, b in linear_in_out)
    per_layer = (params["total"] - params["embedding"]) / layers
    trainable = {"lora": lora, "dora": lora, "qlora": lora, "loha": 2 * lora,
                 "adapter": layers * 2 * 2 * hidden * method.get("adapter_size", 64),
                 "freeze": per_layer * abs(method.get("freeze_trainable_layers", 2)),
                 "full": params["total"]}.get(kind, lora / 100)

    weights = 4 * params["total"]
    if kind == "qlora" or method.get("quantization_bit"):
        bits = method.get("quantization_bit") or 4
        weights = 4 * params["embedding"] + matmul_params * (0.5625 if bits == 4 else 1.0)
    optimizer = 16 * trainable
    per_example = min(float(tokens_per_example or data.get("cutoff_len", 1024)), data.get("cutoff_len", 1024))
    tokens = train.get("batch_size", 4) * per_example
    activations = tokens * layers * (16 * hidden + 3 * inter) * 4
    peak = RUNTIME_BYTES + weights + optimizer + activations
    if train.get("stage") in ("dpo", "kto") and kind in ("full", "freeze"):
        peak += 4 * params["total"]  # a frozen reference copy

    steps_tokens = tokens * train.get("gradient_accumulation_steps", 1)
    if measured_tokens_per_s:
        speed, source = measured_tokens_per_s, "measured"
    else:
        flops_per_token = (6 if kind in ("full", "freeze") else 4) * matmul_params
        speed, source = EFFICIENCY * matmul_flops_per_second() / flops_per_token, "model"
    seconds_per_step = steps_tokens / speed
    return {"parameters": params["total"], "trainable_parameters": int(trainable),
            "memory_mib": {"weights": round(weights / MIB), "optimizer": round(optimizer / MIB),
                           "activations": round(activations / MIB), "runtime": round(RUNTIME_BYTES / MIB),
                           "peak": round(peak / MIB)},
            "tokens_per_step": round(steps_tokens), "tokens_per_s": round(speed, 1), "speed_source": source,
            "seconds_per_step": round(seconds_per_step, 3)}


def with_steps(result: dict, steps: int | None) -> dict:
    """Add the total time for `steps` optimizer steps (None when the step count needs the data)."""
    return {**result, "steps": steps,
            "seconds": round(steps * result["seconds_per_step"], 2) if steps else None}
