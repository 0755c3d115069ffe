"""Generation speed of `lmforge eval` (also compare, the checkpoint sweep and chat): the model's own forward that eval
used before (issue 14) vs the fast batched decoder (model/lean_decoder.py) as eval runs it now, same run, same prompts.

The demo's run (--run runs/demo, trained by `make demo`, loaded as eval loads it) or, without --run, the demo's model
and adapter shape (configs/demo.yaml: the bundled SmolLM2-135M-Instruct + LoRA r=16 on every linear layer, A and B
drawn at random from seed 0 so the adapter changes the replies) answers the demo's held-out prompts
(examples/data/heldout.jsonl) through eval's own generation (evaluate.generate_replies), once per path and round,
the paths' order rotated round by round so the machine's load drifts over all of them alike:

- `own forward`: the model's own forward, length-sorted batches of --before-batch-size (what eval ran before issue
  14, at its default batch size then, 8);
- `fast float32, chunks`: the fast decoder in float32, the same batches one after another (eval at 12:06 UTC on
  2026-12-07, before continuous batching);
- `fast float32`: `--decode-dtype float32` now: one continuous batch over the set on --batch-size rows (eval's
  default now, 32);
- `fast auto`: the default `--decode-dtype auto` now: the same, in the format auto picks on this CPU (said why);
- with `--paths`, also `fast float16` / `fast bfloat16`.

Reports per path wall seconds and process CPU seconds (the steadier figure on a shared machine: with one torch
thread it is the work done, not the time spent waiting for a core), generated tokens per second of each, the
speed-ups over the own forward, and the predictions' agreement with the own forward's (identical replies, and the
share of tokens before the first difference). Measures; changes nothing.

    python benchmarks/eval_speed.py [--run runs/demo] [--max-new-tokens 64] [--batch-size 32] [--before-batch-size 8]
        [--threads 1] [--rounds 2] [--paths …] [--json out]
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

REPO = Path(__file__).resolve().parents[1]
BEFORE = "own forward"
DEFAULT_PATHS = (BEFORE, "fast float32, chunks", "fast float32", "fast auto")
LABELS = {BEFORE: "model's own forward, length-sorted batches (before issue 14)",
          "fast float32, chunks": "fast decoder float32, length-sorted batches (12:06 state)",
          "fast float32": "fast decoder float32, continuous batch (`--decode-dtype float32`)",
          "fast auto": "fast decoder, continuous batch, `--decode-dtype auto` (default) → {weights}",
          "fast float16": "fast decoder float16 (FBGEMM), continuous batch",
          "fast bfloat16": "fast decoder bfloat16 (oneDNN), continuous batch"}


def demo_model(run: Path | None = None):
    """The demo's trained run as eval loads it; or the bundled model + configs/demo.yaml's LoRA, A and B drawn at
    random (seed 0) so the adapter matters."""
    if run is not None:
        from lmforge.generate import load_for_inference

        return load_for_inference(str(run))
    from lmforge.config import load_config
    from lmforge.model.loader import load_tokenizer, resolve_model
    from lmforge.model.methods import apply_method, load_base

    config = load_config(REPO / "configs" / "demo.yaml")
    path = resolve_model(config.model.name_or_path)
    torch.manual_seed(0)  # LoRA's A initialisation
    model = apply_method(load_base(path, torch.float32, config.method), config.method).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model, load_tokenizer(path)


def run(path: str, model, tokenizer, items, max_new_tokens: int, batch_size: int) -> dict:
    """One pass of eval's generation over the set along `path`: seconds (wall, CPU), predictions, decoding."""
    import lmforge.generate as generate
    from lmforge.eval.evaluate import EvalOptions, generate_replies
    from lmforge.generate import SamplingParams

    dtype = {"fast auto": "auto", "fast float16": "float16", "fast bfloat16": "bfloat16"}.get(path, "float32")
    options = EvalOptions(params=SamplingParams(max_new_tokens=max_new_tokens, decode_dtype=dtype),
                          batch_size=batch_size)
    real = generate.lean_decoder
    if path == BEFORE:
        generate.lean_decoder = lambda *args, **kwargs: None  # the model's own forward, as eval ran before
    generate._DECODERS.pop(model, None)  # every path builds its decoder inside its timing, as an eval run does
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        if path == "fast float32, chunks":  # the length-sorted batches, one after another
            order = sorted(range(len(items)), key=lambda i: -len(tokenizer.apply_chat_template(items[i].prompt,
                                                                                              tokenize=False)))
            predictions = [""] * len(items)
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                texts, decoding = generate_replies(model, tokenizer, [items[i] for i in chunk], options, path)
                for i, text in zip(chunk, texts):
                    predictions[i] = text
        else:
            predictions, decoding = generate_replies(model, tokenizer, items, options, path)
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "predictions": predictions,
                "decoding": decoding.as_dict()}
    finally:
        generate.lean_decoder = real


def agreement(tokenizer, ours: list[str], reference: list[str]) -> dict:
    """Identical replies, and the share of the reference's tokens before the first difference (1.0 = all equal)."""
    kept, total = 0, 0
    for a, b in zip(ours, reference):
        x, y = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b))
        same = next((n for n, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        kept += len(y) if x == y else same
        total += len(y)
    return {"identical": sum(a == b for a, b in zip(ours, reference)), "of": len(reference),
            "tokens_before_first_difference": round(kept / max(total, 1), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="a trained run dir (the demo's: runs/demo)")
    parser.add_argument("--data", type=Path, default=REPO / "examples" / "data" / "heldout.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="rows of the continuous batch (eval's default)")
    parser.add_argument("--before-batch-size", type=int, default=8,
                        help="batch size of the own-forward and chunked paths (eval's default before)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=list(LABELS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from lmforge.allocator import bound_kernel_caches
    bound_kernel_caches()  # before the first matmul, as cli.py does for eval, compare, chat and serve
    if BEFORE not in args.paths:
        parser.error(f"--paths must include {BEFORE!r} (the reference for speed-ups and agreement)")
    torch.set_num_threads(args.threads)
    from lmforge.eval.evaluate import TestItem

    machine = machine_info()
    records = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    # the held-out prompts (user turns, no reference answers): generation speed, not scores
    items = [TestItem([m for m in r["messages"] if m["role"] != "assistant"], "", f"{args.data}:{i + 1}", None)
             for i, r in enumerate(records)]
    model, tokenizer = demo_model(args.run)
    results: dict[str, list[dict]] = {path: [] for path in args.paths}
    loads = []
    for round_index in range(args.rounds):
        shift = round_index % len(args.paths)
        for path in args.paths[shift:] + args.paths[:shift]:
            loads.append(machine_info()["load_average"])
            rows = args.before_batch_size if path in (BEFORE, "fast float32, chunks") else args.batch_size
            result = run(path, model, tokenizer, items, args.max_new_tokens, rows)
            result["rows"] = min(rows, len(items))
            results[path].append(result)
            print(f"round {round_index + 1} {path}: wall {result['wall']:.1f} s, CPU {result['cpu']:.1f} s "
                  f"(load {loads[-1]})", file=sys.stderr, flush=True)
    machine_end = machine_info()
    reference = results[BEFORE][0]["predictions"]
    summary = {}
    for path, runs in results.items():
        tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in runs[0]["predictions"])
        wall, cpu = statistics.median(r["wall"] for r in runs), statistics.median(r["cpu"] for r in runs)
        summary[path] = {"rows": runs[0]["rows"], "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens": tokens,
                         "tokens_per_wall_s": round(tokens / wall, 2), "tokens_per_cpu_s": round(tokens / cpu, 2),
                         "decoding": runs[0]["decoding"],
                         "same_predictions_every_round": all(r["predictions"] == runs[0]["predictions"] for r in runs),
                         "agreement_with_own_forward": agreement(tokenizer, runs[0]["predictions"], reference)}
    for path in args.paths:
        for key, name in (("wall_s", "speedup_wall"), ("cpu_s", "speedup_cpu")):
            summary[path][name] = round(summary[BEFORE][key] / summary[path][key], 2)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    subject = (f"the run {args.run}" if args.run else
               "bundled model + configs/demo.yaml's LoRA (r=16, every linear layer, random A and B, seed 0)")
    lines = [f"### eval generation speed, {machine['cpu']}, {date}", "",
             f"`python benchmarks/eval_speed.py {f'--run {args.run} ' if args.run else ''}"
             f"--max-new-tokens {args.max_new_tokens} --batch-size {args.batch_size} "
             f"--before-batch-size {args.before_batch_size} --threads {args.threads} --rounds {args.rounds} "
             f"--paths {' '.join(repr(p) for p in args.paths)}` · "
             f"{len(items)} prompts of {args.data.name} · {subject} · greedy · medians of {args.rounds} rounds, "
             f"order rotated", "",
             "| path | rows | wall s | CPU s | tokens / CPU s | speed-up (CPU) | speed-up (wall) | replies = own "
             "forward's | tokens before first difference |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path in args.paths:
        row = summary[path]
        label = LABELS[path].format(weights=row["decoding"]["weights"])
        agree = row["agreement_with_own_forward"]
        lines.append(f"| {label} | {row['rows']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
                     f"{row['tokens_per_cpu_s']:.1f} | "
                     f"{row['speedup_cpu']:.2f}× | {row['speedup_wall']:.2f}× | {agree['identical']} of "
                     f"{agree['of']} | {100 * agree['tokens_before_first_difference']:.1f} % |")
    auto = summary.get("fast auto", {}).get("decoding")
    lines += ["", f"Machine: {machine_line(machine)} at start, {machine_end['load_average']} at end; load before each "
                  f"pass {min(loads)} … {max(loads)}; {args.threads} torch thread(s); torch {torch.__version__}."]
    if auto:
        lines.append(f"auto chose {auto['weights']}: {auto['reason']}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"date": date, "machine": machine, "machine_end": machine_end,
                                         "loads_before_each_pass": loads,
                                         "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                         "runs": {p: [{k: v for k, v in r.items() if k != "predictions"}
                                                      for r in runs] for p, runs in results.items()},
                                         "predictions": {p: runs[0]["predictions"] for p, runs in results.items()}},
                                        indent=1, ensure_ascii=False))
    fp32 = summary.get("fast float32", {}).get("agreement_with_own_forward")
    return 0 if fp32 is None or fp32["identical"] == fp32["of"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
