"""`lmforge chat`: a terminal conversation with a base model, a trained run, or base + adapter.

Keeps the history, streams each reply, understands /reset and /exit; `--prompt` answers once and exits.
All decoding goes through generate.py, with the training chat template.
"""

from __future__ import annotations

import sys

from .generate import SamplingParams, load_for_inference, stream_reply

HELP = "commands: /reset clears the history, /exit quits"


def run_chat(model, tokenizer, params: SamplingParams, system: str | None = None, prompt: str | None = None) -> None:
    base = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        for piece in stream_reply(model, tokenizer, base + [{"role": "user", "content": prompt}], params):
            print(piece, end="", flush=True)
        print()
        return
    print(HELP)
    history = list(base)
    while True:
        try:
            text = input("\nuser> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(base)
            print("(history cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        pieces = []
        try:
            for piece in stream_reply(model, tokenizer, history, params):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})


def main(args) -> int:
    model, tokenizer = load_for_inference(args.run_dir, args.model, args.adapter)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    run_chat(model, tokenizer, params, system=args.system, prompt=args.prompt)
    sys.stdout.flush()
    return 0
