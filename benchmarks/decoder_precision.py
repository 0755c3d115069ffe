"""The serving decoder's weight formats on this CPU: float32 (oneDNN prepacked), float16 (FBGEMM, float32
activations) and bfloat16 (oneDNN, AMX / AVX512_BF16 where present) — decode step time at batch widths 1 and 8, and
whether a greedy reply is bit-identical alone and beside other sequences of other lengths.

The formats are measured in interleaved rounds in one process (a shared machine's load hits all of them alike); the
median of the rounds is reported. Decides nothing by itself: the figures go into benchmarks/RESULTS.md and the choice
of `decode_dtype auto` is made from them. Measures; changes nothing.

    python benchmarks/decoder_precision.py [--model smollm2-135m-instruct] [--threads 1] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # benchmarks/machine.py: CPU model + flags

FORMATS = ("float32", "float16", "bfloat16")


def step_seconds(decoder, width: int, steps: int, prompt_len: int = 40) -> float:
    """Median seconds of one decode step over `width` slots, after each slot was prefilled with `prompt_len`
    tokens."""
    prompts = [[(7 * slot + i) % 1000 + 10 for i in range(prompt_len)] for slot in range(width)]
    decoder.prefill_many(list(range(width)), prompts, [0] * width, [0] * width)
    times = []
    tokens = [11] * width
    for step in range(steps):
        start = time.perf_counter()
        logits = decoder.decode(list(range(width)), tokens, [prompt_len + step] * width, [0] * width)
        times.append(time.perf_counter() - start)
        tokens = logits.argmax(-1).tolist()
    return statistics.median(times)


def greedy(decoder, slot_prompts: dict[int, list[int]], steps: int) -> dict[int, list[int]]:
    """Greedy tokens for each slot's prompt, all slots decoding together."""
    slots = sorted(slot_prompts)
    logits = decoder.prefill_many(slots, [slot_prompts[s] for s in slots], [0] * len(slots), [0] * len(slots))
    out = {s: [int(row.argmax())] for s, row in zip(slots, logits)}
    for _ in range(steps - 1):
        logits = decoder.decode(slots, [out[s][-1] for s in slots],
                                [len(slot_prompts[s]) + len(out[s]) - 1 for s in slots], [0] * len(slots))
        for s, row in zip(slots, logits):
            out[s].append(int(row.argmax()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from lmforge.allocator import bound_kernel_caches
    bound_kernel_caches()  # before the first matmul, as cli.py does for eval, compare, chat and serve
    torch.set_num_threads(args.threads)
    from lmforge.model.lean_decoder import Decoder, bfloat16_kernels, holds_in_float16
    from lmforge.model.loader import load_model, resolve_model

    machine = machine_info()
    model = load_model(resolve_model(args.model), torch.float32).eval()
    formats = [f for f in FORMATS if (f != "bfloat16" or bfloat16_kernels()) and (f != "float16" or
                                                                                   holds_in_float16(model))]
    decoders = {f: Decoder(model, slots=8, max_len=256, weights=f) for f in formats}
    times: dict[str, dict[int, list[float]]] = {f: {1: [], 8: []} for f in formats}
    for f in formats:  # warm-up: each width's shapes once
        for width in (1, 8):
            step_seconds(decoders[f], width, 2)
    for round_ in range(args.rounds):
        for f in formats:
            for width in (1, 8):
                times[f][width].append(step_seconds(decoders[f], width, args.steps))
        print(f"round {round_ + 1}: " + "  ".join(f"{f} {times[f][1][-1] * 1000:.1f}/{times[f][8][-1] * 1000:.1f} ms"
                                                  for f in formats), file=sys.stderr, flush=True)
    # bit-identical alone vs beside two other sequences of other lengths
    prompt = [(3 * i) % 900 + 20 for i in range(30)]
    others = {1: [(5 * i) % 800 + 30 for i in range(12)], 2: [(11 * i) % 700 + 40 for i in range(50)]}
    identical, agree_fp32 = {}, {}
    reference = None
    for f in formats:
        alone = greedy(Decoder(model, slots=3, max_len=128, weights=f), {0: prompt}, 32)[0]
        beside = greedy(Decoder(model, slots=3, max_len=128, weights=f), {0: prompt, **others}, 32)[0]
        identical[f] = alone == beside
        reference = alone if f == "float32" else reference
        agree_fp32[f] = sum(a == b for a, b in zip(alone, reference or alone)) if reference else None
    figures = {f: {"step_ms_width1": round(statistics.median(times[f][1]) * 1000, 2),
                   "step_ms_width8": round(statistics.median(times[f][8]) * 1000, 2),
                   "tokens_per_s_width1": round(1 / statistics.median(times[f][1]), 1),
                   "tokens_per_s_width8": round(8 / statistics.median(times[f][8]), 1),
                   "alone_equals_batched": identical[f],
                   "greedy_tokens_equal_to_float32_of_32": agree_fp32[f]} for f in formats}
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine_end = machine_info()
    lines = [f"### Decoder weight formats, {machine['cpu']}, {date}", "",
             f"`python benchmarks/decoder_precision.py --threads {args.threads} --rounds {args.rounds}` · "
             f"`{args.model}` · {args.steps} decode steps per measurement after a 40-token prompt per slot, median "
             f"of {args.rounds} interleaved rounds", "",
             "| weights | step ms, 1 sequence | step ms, 8 sequences | tokens/s 1 / 8 | reply alone = beside others "
             "| greedy tokens = float32's (of 32) |", "|---|---:|---:|---:|---|---:|"]
    for f, row in figures.items():
        lines.append(f"| {f} | {row['step_ms_width1']:.1f} | {row['step_ms_width8']:.1f} | "
                     f"{row['tokens_per_s_width1']:.1f} / {row['tokens_per_s_width8']:.1f} | "
                     f"{'yes' if row['alone_equals_batched'] else 'NO'} | "
                     f"{row['greedy_tokens_equal_to_float32_of_32']} |")
    lines += ["", f"Machine: {machine_line(machine)} at start, {machine_end['load_average']} at end; "
                  f"{args.threads} torch thread(s); torch {torch.__version__}."]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"date": date, "machine": machine, "machine_end": machine_end,
                                         "args": vars(args) | {"json": str(args.json)}, "figures": figures,
                                         "rounds_ms": {f: {w: [round(t * 1000, 2) for t in v] for w, v in d.items()}
                                                       for f, d in times.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
