"""Serving speed on the bundled model: lmforge serve (HTTP, openai client, loopback) vs sequential transformers
`generate` in the same run.

Measures (1) the peer: transformers generate, batch 1, one prompt after another — tokens/s and time to first token;
(2) lmforge, one client streaming — decode tokens/s after the first token, and TTFT; (3) lmforge, N concurrent
clients — aggregate generated tokens/s, p50/p95 latency and TTFT, and that every reply equals the single-stream
greedy reply for its prompt (nothing lost, duplicated or mixed up). Bounded: fixed request counts, max_tokens, and a
wall-clock limit. Greedy decoding, ignore end-of-turn so every reply has exactly --max-tokens tokens.

    python benchmarks/serve.py [--clients 8] [--requests-per-client 2] [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import torch

PROMPTS = [f"Question {i}: in two sentences, what does a contract clause about {topic} usually say?"
           for i, topic in enumerate(["termination", "liability", "confidentiality", "payment terms", "force majeure",
                                      "governing law", "warranties", "assignment", "notices", "dispute resolution",
                                      "indemnity", "intellectual property", "non-compete", "severability",
                                      "amendments", "entire agreement"])]


def peer_generate(model, tokenizer, prompts: list[str], max_tokens: int) -> dict:
    """transformers generate, one prompt at a time (what a toolkit's HF-backend server does per request)."""
    from lmforge.render import render_prompt

    rows = []
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)  # warm-up, like the server's
    for text in prompts:
        ids = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": text}])])
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        rows.append((first, time.perf_counter() - start, out.shape[1] - ids.shape[1]))
    total_time = sum(r[1] for r in rows)
    return {"tokens_per_s": sum(r[2] for r in rows) / total_time, "ttft_s": statistics.median(r[0] for r in rows),
            "requests": len(rows)}


def stream_one(url: str, prompt: str, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    stamps, text = [], ""
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
            text += chunk.choices[0].text
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft": stamps[0] - start, "latency": end - start, "tokens": tokens, "text": text,
            "decode_tokens_per_s": (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--peer-requests", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the concurrent phase")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()

    from lmforge.models import load_model, load_tokenizer, resolve_model
    from lmforge.serve.app import create_app
    from lmforge.serve.loading import build_engine
    from lmforge.serve.settings import ServeSettings

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_serve_support import live_server  # uvicorn in a thread on a free loopback port

    threads = max(1, (__import__("os").cpu_count() or 2) - 1)  # what lmforge serve uses by default
    torch.set_num_threads(threads)  # the peer gets the same threads: a like-for-like comparison
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch.float32).eval()
    print(f"peer: transformers generate, batch 1, {args.peer_requests} prompts × {args.max_tokens} tokens…",
          flush=True)
    peer = peer_generate(model, tokenizer, PROMPTS[:args.peer_requests], args.max_tokens)
    del model
    print(f"  {peer['tokens_per_s']:.1f} tokens/s, TTFT {peer['ttft_s']:.2f} s", flush=True)

    settings = ServeSettings(max_concurrent=args.clients, served_model_name="bench", max_queue=4 * args.clients)
    engine = build_engine(None, path, {}, settings)
    engine.models["bench"].text_stop_ids = frozenset()  # no end of text: exactly max_tokens per reply
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients * args.requests_per_client)]
    with live_server(create_app(engine, settings)) as (url, _):
        stream_one(url, PROMPTS[0], 4)  # warm-up
        print("lmforge: one client streaming…", flush=True)
        singles = {p: stream_one(url, p, args.max_tokens) for p in dict.fromkeys(prompts)}
        single_tps = statistics.median(r["decode_tokens_per_s"] for r in singles.values())
        single_ttft = statistics.median(r["ttft"] for r in singles.values())
        print(f"  decode {single_tps:.1f} tokens/s, TTFT {single_ttft:.2f} s", flush=True)

        print(f"lmforge: {args.clients} concurrent clients × {args.requests_per_client} requests…", flush=True)
        deadline = time.monotonic() + args.time_limit
        lock, results = threading.Lock(), []

        def client(index: int) -> None:
            for r in range(args.requests_per_client):
                if time.monotonic() > deadline:
                    return
                prompt = prompts[index * args.requests_per_client + r]
                result = stream_one(url, prompt, args.max_tokens)
                with lock:
                    results.append((prompt, result))
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        wall = time.perf_counter() - start
    mismatched = sum(result["text"] != singles[prompt]["text"] for prompt, result in results)
    concurrent = {
        "clients": args.clients, "requests": len(results), "expected_requests": len(prompts),
        "replies_not_equal_single_stream": mismatched,
        "tokens_per_s": sum(r["tokens"] for _, r in results) / wall,
        "latency_p50_s": percentile([r["latency"] for _, r in results], 0.5),
        "latency_p95_s": percentile([r["latency"] for _, r in results], 0.95),
        "ttft_p50_s": percentile([r["ttft"] for _, r in results], 0.5),
        "ttft_p95_s": percentile([r["ttft"] for _, r in results], 0.95),
    }
    figures = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, {threads} torch thread(s)",
        "model": args.model, "max_tokens": args.max_tokens, "peer_generate_batch1": peer,
        "lmforge_single_stream": {"decode_tokens_per_s": single_tps, "ttft_s": single_ttft},
        "lmforge_concurrent": concurrent,
        "speedup_vs_peer": concurrent["tokens_per_s"] / peer["tokens_per_s"],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    ok = mismatched == 0 and len(results) == len(prompts)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
