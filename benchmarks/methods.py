"""Every fine-tuning method on the bundled model, same data, same steps: trainable parameters, peak memory,
tokens/s and loss after N steps — the figures behind the README's "which method should I pick?" table.

Each method runs in its own child process (so its peak RSS is its own) through lmforge/train/'s own pieces:
prepare_data → apply_method → prepare_for_training → the sft stage's batch() → train_step, with the same seeded batches.
The parent runs the children one after the other and prints a Markdown table for benchmarks/RESULTS.md. Measures;
changes nothing.

    python benchmarks/methods.py                         # all methods, 8 timed steps after 1 warm-up (~11 min)
    python benchmarks/methods.py --methods lora qlora --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [REPO / "examples" / "data" / "domain.jsonl", REPO / "examples" / "data" / "identity.jsonl"]
# (label, method settings): each label is one row of the table
METHODS = {
    "lora": {"type": "lora"},
    "dora": {"type": "dora"},
    "qlora (4-bit nf4)": {"type": "qlora"},
    "qlora (8-bit)": {"type": "qlora", "quantization_bit": 8},
    "loha": {"type": "loha"},
    "lokr": {"type": "lokr"},
    "ia3": {"type": "ia3"},
    "prefix": {"type": "prefix"},
    "ptuning": {"type": "ptuning"},
    "prompt": {"type": "prompt", "prompt_init_text": "Answer the question."},
    "adapter": {"type": "adapter"},
    "freeze (last 2 layers)": {"type": "freeze", "freeze_trainable_layers": 2},
    "full": {"type": "full"},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=None, help="labels or method types (default: all)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (default 8)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="default: 5e-5 for full/freeze, 3e-3 for prefix, "
                                                               "3e-2 for ptuning/prompt/ia3, 1e-3 otherwise")
    parser.add_argument("--eval-examples", type=int, default=16,
                        help="the fixed examples whose loss is measured before and after training (default 16)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per child (default 1: on a shared machine extra threads oversubscribe)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def default_lr(method: dict) -> float:
    """A usual learning rate per family (PEFT's and LLaMA-Factory's examples): the comparison is of methods as they
    are used, not at one learning rate that suits none of them."""
    if method["type"] in ("full", "freeze"):
        return 5e-5
    if method["type"] in ("ptuning", "prompt", "ia3"):
        return 3e-2
    if method["type"] == "prefix":  # the reparameterising MLP diverges at prompt-tuning rates
        return 3e-3
    return 1e-3


def run_child(args) -> dict:
    """One method: load, apply, train warmup + steps; report what the parent tabulates."""
    import torch
    from transformers import get_scheduler

    from lmforge.config import Config
    from lmforge.model.loader import (
        load_model,
        load_tokenizer,
        pick_dtype,
        resolve_model,
    )
    from lmforge.model.methods import apply_method, trainable_summary
    from lmforge.train.batching import DataOrder
    from lmforge.train.loop import prepare_for_training
    from lmforge.train.losses import sft_loss_sum
    from lmforge.train.stages import STAGES, prepare_data
    from lmforge.train.step import train_step

    torch.set_num_threads(args.threads)
    method = METHODS[args.child]
    lr = args.lr or default_lr(method)
    config = Config.model_validate({"model": {"name_or_path": args.model}, "method": method,
                                    "data": {"train": [str(p) for p in DEFAULT_DATA], "cutoff_len": args.cutoff},
                                    "train": {"batch_size": args.batch_size, "seed": 42}})
    torch.manual_seed(42)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    data = prepare_data(config, tokenizer)
    model = prepare_for_training(apply_method(load_model(path, pick_dtype("float32")), config.method))
    summary = trainable_summary(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    scheduler = get_scheduler("constant", optimizer)
    order = DataOrder(len(data.train), args.batch_size, 1, 42)
    pad = tokenizer.pad_token_id or 0
    held = [STAGES["sft"].batch(data.train[i:i + 4], config.method.virtual_tokens, pad)
            for i in range(0, args.eval_examples, 4)]

    def fixed_loss() -> float:  # the same examples for every method, before and after: comparable, unlike step losses
        with torch.no_grad():
            return sum(float(sft_loss_sum(model, b)) for b in held) / sum(b.num_supervised for b in held)

    loss_before = fixed_loss()
    losses, tokens, elapsed = [], 0, 0.0
    for step in range(args.warmup + args.steps):
        batches = [STAGES["sft"].batch([data.train[i] for i in idx], config.method.virtual_tokens, pad)
                   for idx in order.step(step)]
        start = time.perf_counter()
        result = train_step(model, batches, parameters, optimizer, scheduler, 1.0)
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
            tokens += result.tokens
        losses.append(result.loss_sum / result.units)
    loss_after = fixed_loss()
    trainable = sum(p.numel() for p in parameters)
    return {"method": args.child, "settings": method, "lr": lr, "trainable": trainable, "summary": summary,
            "tokens_per_s": tokens / elapsed, "seconds_per_step": elapsed / args.steps, "losses": losses,
            "loss_before": loss_before, "loss_after": loss_after,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        args.out.write_text(json.dumps(run_child(args)))
        return 0
    wanted = args.methods or list(METHODS)
    labels = [label for label in METHODS if label in wanted or METHODS[label]["type"] in wanted]
    results = []
    for label in labels:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, __file__, "--child", label, "--out", str(out), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--cutoff",
                       str(args.cutoff), "--model", args.model, "--threads", str(args.threads),
                       "--eval-examples", str(args.eval_examples)] + \
                (["--lr", str(args.lr)] if args.lr else [])
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{label}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(out.read_text())
            result["wall_s"] = time.perf_counter() - started
            results.append(result)
            print(f"{label}: {result['trainable']:,} trainable · {result['peak_rss_mib']:,.0f} MiB · "
                  f"{result['tokens_per_s']:.1f} tok/s · loss {result['loss_before']:.3f} → "
                  f"{result['loss_after']:.3f} ({result['wall_s']:.0f} s)", flush=True)
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def table(results: list[dict], args) -> str:
    import torch
    import transformers

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### Methods on `{args.model}`, {platform.processor() or platform.machine()}, {when}", "",
             f"`python benchmarks/methods.py --steps {args.steps} --warmup {args.warmup} --batch-size "
             f"{args.batch_size} --cutoff {args.cutoff} --threads {args.threads}` · fp32 CPU · SFT on "
             f"examples/data/domain.jsonl + identity.jsonl · batch {args.batch_size} · cutoff {args.cutoff} · "
             f"constant lr (column) · same seeded batches for every method · torch {torch.__version__}, "
             f"transformers {transformers.__version__} · shared 2-core machine: compare within this table", "",
             f"| method | trainable params | peak RSS | tokens/s | s/step | lr | loss on {args.eval_examples} fixed "
             f"examples: before → after |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['peak_rss_mib']:,.0f} MiB | "
                     f"{r['tokens_per_s']:.1f} | {r['seconds_per_step']:.2f} | {r['lr']:g} | "
                     f"{r['loss_before']:.3f} → {r['loss_after']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
