"""Does a training process's memory keep growing? The bundled model with `make demo`'s LoRA (rank 16, every linear
layer) under the precision `lmforge train` would choose, trained step after step on micro-batches of the demo's
domain data: either the same batch every step (`--same`) or a fresh random draw of examples each step, so the
packed row length changes from step to step. Prints resident memory (VmRSS) and its high-water mark (VmHWM) every
`--every` steps, and jemalloc's own counters where it is the allocator. Run it under the allocator `lmforge train`
uses (LD_PRELOAD=…/libjemalloc.so.2) or glibc's. oneDNN's kernel caches are bounded as `lmforge train` bounds them
(allocator.bound_kernel_caches) unless ONEDNN_PRIMITIVE_CACHE_CAPACITY / LRU_CACHE_CAPACITY are set: 1024 each is
their own default. Measures; changes nothing.

    python benchmarks/memory_growth.py [--steps 60] [--every 10] [--batch-size 8] [--same] [--threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # benchmarks/machine.py: CPU model + flags

from lmforge.allocator import KERNEL_CACHE_VARIABLES, bound_kernel_caches, jemalloc_loaded
from lmforge.config import MethodConfig
from lmforge.conversation import Conversation
from lmforge.data.render import render_example
from lmforge.model.loader import load_model, load_tokenizer, resolve_model
from lmforge.model.methods import apply_method
from lmforge.model.precision import keep_frozen_weights, training_precision
from lmforge.train.batching import pack
from lmforge.train.loop import prepare_for_training
from lmforge.train.step import train_step

REPO = Path(__file__).resolve().parents[1]


def memory_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            name, value = line.split()[:2]
            fields[name.rstrip(":")] = int(value)
    return fields


def jemalloc_stats() -> dict[str, int] | None:
    """jemalloc's own counters in bytes (allocated: live blocks the program holds; active: the pages those blocks
    sit on; resident: pages jemalloc has mapped in, freed-but-kept ones included), or None on another allocator."""
    if not jemalloc_loaded():
        return None
    library = ctypes.CDLL(None)
    mallctl = library.mallctl
    epoch = ctypes.c_uint64(1)
    mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(8))  # refresh the statistics
    stats = {}
    for name in ("allocated", "active", "resident"):
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        mallctl(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0))
        stats[name] = value.value
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--same", action="store_true", help="the same micro-batch (the longest examples) every step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="what `train.dtype` would say: auto, bf16, float32")
    parser.add_argument("--data", type=Path, default=REPO / "examples" / "data" / "domain.jsonl")
    args = parser.parse_args(argv)
    bound_kernel_caches()  # before the first matmul, as cli.py does
    torch.set_num_threads(args.threads)

    path = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    model = apply_method(load_model(path, torch.float32),
                         MethodConfig(type="lora", lora_rank=16, lora_alpha=32, lora_target="all"))
    model = prepare_for_training(model)
    precision = training_precision(args.precision, SimpleNamespace(hidden_size=model.config.hidden_size,
                                                           intermediate_size=model.config.intermediate_size))
    if precision.frozen_dtype is not None:
        keep_frozen_weights(model, precision.frozen_dtype)
    lines = args.data.read_text(encoding="utf-8").splitlines()
    examples = [render_example(tokenizer, Conversation.from_dicts(json.loads(line)["messages"]), "assistant")
                for line in lines if line.strip()]
    examples.sort(key=lambda e: -len(e.input_ids))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    draw = random.Random(0)
    print(f"{'the same batch' if args.same else 'a random batch'} of {args.batch_size} each step; precision: "
          f"{precision.reason}", file=sys.stderr)
    heap = ["jemalloc allocated MiB", "active", "resident"] if jemalloc_loaded() else []
    print("| " + " | ".join(["step", "VmRSS MiB", "VmHWM MiB", *heap, "tokens in this step's row"]) + " |")
    print("|" + "---:|" * (4 + len(heap)))
    for step in range(args.steps + 1):
        chosen = examples[:args.batch_size] if args.same else draw.sample(examples, args.batch_size)
        batch = pack(chosen)
        train_step(model, [batch], parameters, optimizer, scheduler, 1.0, precision=precision.context())
        if step % args.every == 0:
            kib = memory_kib()
            heap = [f"{value >> 20:,}" for value in (jemalloc_stats() or {}).values()]
            row = [str(step), f"{kib['VmRSS'] // 1024:,}", f"{kib['VmHWM'] // 1024:,}", *heap, str(batch.num_tokens)]
            print("| " + " | ".join(row) + " |", flush=True)
    env = {name: os.environ[name] for name in (*KERNEL_CACHE_VARIABLES, "LD_PRELOAD") if name in os.environ}
    print(f"\nMachine: {machine_line(machine_info())}; env {env or 'as is'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
