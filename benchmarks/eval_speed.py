"""Generation speed of `lmforge eval` (also compare, the checkpoint sweep and chat): the fast batched decoder
(model/lean_decoder.py, float32 weights) vs the model's own forward that eval used before, same run, same prompts.

The demo's model and adapter shape (configs/demo.yaml: the bundled SmolLM2-135M-Instruct + LoRA r=16 on every linear
layer, its B matrices drawn at random so the adapter changes the replies) answers the demo's held-out prompts
(examples/data/heldout.jsonl) through eval's own `generate_all` (length-sorted batches of --batch-size), once per
path, alternating for --rounds. Reports seconds, generated tokens/s, the speed-up, and whether every prediction is
identical between the two paths. Measures; changes nothing.

    python benchmarks/eval_speed.py [--max-new-tokens 128] [--batch-size 8] [--threads 1] [--rounds 1] [--json out]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # benchmarks/machine.py: CPU model + flags

REPO = Path(__file__).resolve().parents[1]


def demo_model():
    """The bundled model + configs/demo.yaml's LoRA, B drawn at random (seed 0) so the adapter matters."""
    from lmforge.config import load_config
    from lmforge.model.loader import load_tokenizer, resolve_model
    from lmforge.model.methods import apply_method, load_base

    config = load_config(REPO / "configs" / "demo.yaml")
    path = resolve_model(config.model.name_or_path)
    model = apply_method(load_base(path, torch.float32, config.method), config.method).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model, load_tokenizer(path)


def run(path: str, model, tokenizer, items, options) -> tuple[float, list[str]]:
    import lmforge.generate as generate
    from lmforge.eval.evaluate import generate_all

    real = generate.lean_decoder
    if path == "own forward":
        generate.lean_decoder = lambda *args: None  # what eval ran before: the model's own forward
    try:
        start = time.perf_counter()
        predictions = generate_all(model, tokenizer, items, options, path)
        return time.perf_counter() - start, predictions
    finally:
        generate.lean_decoder = real


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "examples" / "data" / "heldout.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lmforge.eval.evaluate import EvalOptions, TestItem
    from lmforge.generate import SamplingParams

    machine = machine_info()
    records = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    # the held-out prompts (user turns, no reference answers): generation speed, not scores
    items = [TestItem(r["messages"], "", f"{args.data}:{i + 1}", None) for i, r in enumerate(records)]
    options = EvalOptions(params=SamplingParams(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size)
    model, tokenizer = demo_model()
    seconds = {"fast decoder": [], "own forward": []}
    outputs = {}
    for _ in range(args.rounds):
        for path in ("own forward", "fast decoder"):
            elapsed, predictions = run(path, model, tokenizer, items, options)
            seconds[path].append(elapsed)
            outputs[path] = predictions
            print(f"{path}: {elapsed:.1f} s", file=sys.stderr, flush=True)
    tokens = {path: sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in outputs[path])
              for path in outputs}
    best = {path: min(values) for path, values in seconds.items()}
    identical = outputs["fast decoder"] == outputs["own forward"]
    speedup = best["own forward"] / best["fast decoder"]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine_end = machine_info()
    lines = [f"### eval generation speed, {machine['cpu']}, {date}", "",
             f"`python benchmarks/eval_speed.py --max-new-tokens {args.max_new_tokens} --batch-size "
             f"{args.batch_size} --threads {args.threads} --rounds {args.rounds}` · {len(items)} prompts of "
             f"{args.data.name} · bundled model + configs/demo.yaml's LoRA (r=16, every linear layer, random B) · "
             f"greedy · eval's own generate_all (length-sorted batches of {args.batch_size})", "",
             "| path | seconds (best of rounds) | generated tokens/s | predictions |", "|---|---:|---:|---|"]
    for path in ("own forward", "fast decoder"):
        lines.append(f"| {'model forward (before)' if path == 'own forward' else 'fast decoder, float32 (now)'} | "
                     f"{best[path]:.1f} | {tokens[path] / best[path]:.1f} | "
                     f"{'identical' if identical else 'DIFFER'} |")
    lines += ["", f"Speed-up: **{speedup:.2f}×**. Machine: {machine_line(machine)} at start, "
                  f"{machine_end['load_average']} at end; {args.threads} torch thread(s); torch {torch.__version__}."]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"date": date, "machine": machine, "machine_end": machine_end,
                                         "args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds,
                                         "tokens": tokens, "speedup": speedup, "identical": identical,
                                         "predictions": outputs}, indent=1, ensure_ascii=False))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
