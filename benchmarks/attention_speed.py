"""One example's causal attention, forward + backward, as CPU bf16 training runs it: torch's flash attention
(`scaled_dot_product_attention`) in float32 and in bf16 against lmforge's blocked kernel (model/blocked_attention.py),
keeping its probabilities for the backward and recomputing them. The default shape is the bundled model's, 9 query
heads / 3 key-value heads × 64, which is SmolLM2-135M. Also reports each output's and gradient's distance from float32
flash on the same bf16-rounded inputs.

The contenders run in interleaved rounds in one process, and each figure is the best of its rounds in ms. Measures;
changes nothing.

    python benchmarks/attention_speed.py [--lengths 64 128 256 512 1024] [--precision bf16|float32] [--threads 1]
                                         [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # benchmarks/machine.py: CPU model + flags

from lmforge.model import blocked_attention


def flash(dtype):
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True,
                                              enable_gqa=True)
    return attend


def blocked(keep: bool, dtype=torch.bfloat16):
    def attend(q, k, v):
        saved = blocked_attention.KEEP_PROBABILITIES_UP_TO
        blocked_attention.KEEP_PROBABILITIES_UP_TO = 1 << 30 if keep else 0
        try:
            return blocked_attention.causal_attention(q, k, v, q.shape[-1] ** -0.5, dtype)
        finally:
            blocked_attention.KEEP_PROBABILITIES_UP_TO = saved
    return attend


CONTENDERS = {"flash float32": flash(torch.float32), "flash bf16": flash(torch.bfloat16),
              "blocked, probabilities kept": blocked(True), "blocked, recomputed": blocked(False)}
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
FLOAT32_CONTENDERS = {"flash float32": flash(torch.float32), "blocked float32, kept": blocked(True, torch.float32),
                      "blocked float32, recomputed": blocked(False, torch.float32)}


def inputs(length: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    """bf16-representable values (so every contender sees the same numbers), held in `dtype`."""
    generator = torch.Generator().manual_seed(length)
    q = (torch.randn(1, heads, length, dim, generator=generator) * 2).bfloat16().to(dtype).requires_grad_()
    k = (torch.randn(1, kv_heads, length, dim, generator=generator) * 2).bfloat16().to(dtype).requires_grad_()
    v = torch.randn(1, kv_heads, length, dim, generator=generator).bfloat16().to(dtype).requires_grad_()
    return q, k, v, torch.randn(1, heads, length, dim, generator=generator).bfloat16().to(dtype)


def run_once(attend, q, k, v, grad_out) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    out = attend(q, k, v)
    out.backward(grad_out.to(out.dtype))
    seconds = time.perf_counter() - start
    results = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    q.grad = k.grad = v.grad = None
    return seconds, results


def relative_error(results, reference) -> float:
    return max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(results, reference))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 384, 512, 1024])
    parser.add_argument("--precision", choices=("bf16", "float32"), default="bf16",
                        help="bf16: as CPU bf16 training runs (the default); float32: the kernel in float32 against "
                             "float32 flash, as float32 training would run it")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    contenders = CONTENDERS if args.precision == "bf16" else FLOAT32_CONTENDERS
    input_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    machine = machine_info()
    # instruction sets a run was held to (e.g. an AVX-512 CPU running only its AVX2 code paths), recorded beside it
    machine["isa_limits"] = {name: os.environ[name] for name in ISA_LIMITS if name in os.environ}
    rows = []
    for length in args.lengths:
        q, k, v, grad_out = inputs(length, args.heads, args.kv_heads, args.dim, input_dtype)
        best = dict.fromkeys(contenders, float("inf"))
        results = {}
        for _ in range(args.rounds):
            for name, attend in contenders.items():
                seconds, results[name] = run_once(attend, q, k, v, grad_out)
                best[name] = min(best[name], seconds)
        reference = results["flash float32"]
        rows.append({"tokens": length, "ms": {name: round(s * 1e3, 3) for name, s in best.items()},
                     "relative_error_vs_float32": {name: float(f"{relative_error(r, reference):.2e}")
                                                   for name, r in results.items() if name != "flash float32"}})
        print(f"{length} tokens: " + ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in best.items()),
              file=sys.stderr, flush=True)
    command = "python benchmarks/attention_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n`{command.strip()}` — {args.heads} query / {args.kv_heads} key-value heads × {args.dim}, "
          f"{args.threads} thread(s), best of {args.rounds} rounds, ms for forward + backward\n")
    names = list(contenders)
    kept = names[2] if args.precision == "bf16" else names[1]
    others = names[1:]
    print("| tokens | " + " | ".join(names) + f" | flash float32 / {kept} | error vs float32: "
          + " / ".join(others) + " |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for row in rows:
        ms, err = row["ms"], row["relative_error_vs_float32"]
        print(f"| {row['tokens']} | " + " | ".join(f"{ms[n]:.2f}" for n in names)
              + f" | {ms['flash float32'] / ms[kept]:.2f}× | " + " / ".join(f"{err[n]:.1e}" for n in others) + " |")
    limits = ", ".join(f"{k}={v}" for k, v in machine["isa_limits"].items())
    print(f"\nMachine: {machine_line(machine)}{'; code paths held to ' + limits if limits else ''}; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": machine, "threads": args.threads,
                                         "rounds": args.rounds, "precision": args.precision, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
