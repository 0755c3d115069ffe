"""`lmforge chat`: a terminal conversation with a base model, a trained run, or base + adapter.

Keeps the history, streams each reply, understands /reset and /exit; `--prompt` answers once and exits. A LLaMA-Factory
inference YAML names the model, adapter, template and sampling instead of the flags.
All decoding goes through generate.py, with the training chat template.
"""

from __future__ import annotations

import sys

from .config.llamafactory_infer import read_inference_yaml
from .data.render import ensure_chat_template
from .errors import UserError
from .generate import SamplingParams, load_for_inference, prepare_decoding, stream_reply

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
    if args.run_dir and args.run_dir.endswith((".yaml", ".yml")):
        return _main_from_inference_yaml(args)
    model, tokenizer = load_for_inference(args.run_dir, args.model, args.adapter)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, decode_dtype=args.decode_dtype)
    print(prepare_decoding(model, params).line(), file=sys.stderr)
    run_chat(model, tokenizer, params, system=args.system, prompt=args.prompt)
    sys.stdout.flush()
    return 0


def _main_from_inference_yaml(args) -> int:
    """`lmforge chat infer.yaml`: LLaMA-Factory's inference file (model, adapter, template, sampling, system)."""
    if args.model or args.adapter:
        raise UserError(f"{args.run_dir} already names the model and adapter; drop --model / --adapter")
    request = read_inference_yaml(args.run_dir)
    for note in request.notes:
        print(f"note: {note}")
    if request.backend:
        print(f"note: {args.run_dir}: infer_backend: {request.backend} — the terminal chat decodes with lmforge's own "
              f"loop; `lmforge serve {args.run_dir}` runs vLLM's engine (ignored)")
    model, tokenizer = load_for_inference(request.run_dir, request.model, request.adapter, dtype=request.dtype)
    if request.template and not request.run_dir:
        note = ensure_chat_template(tokenizer, request.template)
        if note:
            print(f"note: {note}")
    params = SamplingParams(max_new_tokens=request.max_new_tokens or args.max_new_tokens,
                            temperature=args.temperature if request.temperature is None else request.temperature,
                            top_p=args.top_p if request.top_p is None else request.top_p, seed=args.seed,
                            decode_dtype=args.decode_dtype)
    print(prepare_decoding(model, params).line(), file=sys.stderr)
    run_chat(model, tokenizer, params, system=args.system or request.system, prompt=args.prompt)
    sys.stdout.flush()
    return 0
