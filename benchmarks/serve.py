"""Serving speed on the bundled model: lmforge serve (HTTP, openai client, loopback) vs sequential transformers
`generate` in the same run.

Measures (1) the peer: transformers generate, batch 1, one prompt after another — tokens/s and time to first token;
(2) llama.cpp (llama-cpp-python, where installed) on the very GGUF file the bundled model comes from, batch 1 —
decode tokens/s and TTFT; (3) `lmforge serve` in its own process, one client streaming — decode tokens/s after the
first token, and TTFT;
(4) lmforge, N concurrent clients — aggregate generated tokens/s, p50/p95 latency and TTFT, and that every reply
equals the single-stream greedy reply for its prompt (nothing lost, duplicated or mixed up). (3) and (4) run once per
--decode-dtype, with the server's start-up time and peak RSS; (5) the same with `--backend vllm` (vLLM's engine,
run by .venv-vllm's python: `make vllm`). Bounded: fixed request counts, max_tokens, and a
wall-clock limit. Greedy decoding, end of text ignored (`ignore_eos`) so every reply has exactly --max-tokens tokens.
Every side gets the same --threads.

    python benchmarks/serve.py [--clients 8] [--requests-per-client 2] [--max-tokens 64] [--threads N]
                               [--decode-dtype float16 --decode-dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # benchmarks/machine.py: CPU model + flags

PROMPTS = [f"Question {i}: in two sentences, what does a contract clause about {topic} usually say?"
           for i, topic in enumerate(["termination", "liability", "confidentiality", "payment terms", "force majeure",
                                      "governing law", "warranties", "assignment", "notices", "dispute resolution",
                                      "indemnity", "intellectual property", "non-compete", "severability",
                                      "amendments", "entire agreement"])]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The question under the chat template, or as plain text for a base model without one."""
    from lmforge.data.render import render_prompt

    if getattr(tokenizer, "chat_template", None):
        return render_prompt(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text)["input_ids"]


def peer_generate(model, tokenizer, prompts: list[str], max_tokens: int) -> dict:
    """transformers generate, one prompt at a time (what a toolkit's HF-backend server does per request)."""
    rows = []
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)  # warm-up, like the server's
    for text in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, text)])
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        rows.append((first, time.perf_counter() - start, out.shape[1] - ids.shape[1]))
    total_time = sum(r[1] for r in rows)
    return {"tokens_per_s": sum(r[2] for r in rows) / total_time, "ttft_s": statistics.median(r[0] for r in rows),
            "requests": len(rows)}


def peer_llama_cpp(gguf_path: Path, tokenizer, prompts: list[str], max_tokens: int, threads: int) -> dict | None:
    """llama.cpp through llama-cpp-python, batch 1, on the GGUF file itself (Q4_1): decode tokens/s and TTFT."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    never_stop = {llm.token_eos(): -1e9}  # exactly max_tokens, as on the other sides
    rows = []
    for text in prompts:
        ids = prompt_ids(tokenizer, text)
        start, stamps = time.perf_counter(), []
        for _ in llm.create_completion(ids, max_tokens=max_tokens, temperature=0, stream=True,
                                       logit_bias=never_stop):
            stamps.append(time.perf_counter())
        llm.reset()
        rows.append((stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])))
    return {"decode_tokens_per_s": statistics.median(r[1] for r in rows),
            "ttft_s": statistics.median(r[0] for r in rows),
            "requests": len(rows), "weights": gguf_path.name}


def stream_one(url: str, prompt: str, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    stamps, text = [], ""
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
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


def measure_lmforge(args, path: str, dtype: str, threads: int, peer: dict, backend: str = "lmforge") -> dict:
    """`lmforge serve` in its own process (as users run it) with this decode_dtype, or with `--backend vllm` through
    .venv-vllm's python (vLLM's CPU defaults: float32, eager; its OpenMP threads bound to the same number of cores):
    one client streaming, then args.clients concurrent clients; the server's peak RSS at the end."""
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"lmforge-bench-serve-{backend}-{dtype}.log"
    python = args.vllm_python if backend == "vllm" else sys.executable
    command = [python, "-m", "lmforge", "serve", "--model", path, "--port", str(port), "--threads",
               str(threads), "--decode-dtype", dtype, "--max-concurrent", str(args.clients),
               "--served-model-name", "bench", "--backend", backend]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if backend == "vllm":
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_NO_USAGE_STATS="1")
    label = "vLLM (float32)" if backend == "vllm" else f"lmforge (decode_dtype {dtype})"
    print(f"{label}: {' '.join(command[2:])}  (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, log)
        start_up = time.perf_counter() - started
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients * args.requests_per_client)]
        stream_one(url, PROMPTS[0], 4)  # warm-up
        print("  one client streaming…", flush=True)
        singles = {p: stream_one(url, p, args.max_tokens) for p in dict.fromkeys(prompts)}
        single_tps = statistics.median(r["decode_tokens_per_s"] for r in singles.values())
        single_ttft = statistics.median(r["ttft"] for r in singles.values())
        print(f"  decode {single_tps:.1f} tokens/s, TTFT {single_ttft:.2f} s", flush=True)

        print(f"  {args.clients} concurrent clients × {args.requests_per_client} requests…", flush=True)
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
        peak_rss = peak_rss_gb(server.pid)
    finally:
        server.send_signal(signal.SIGINT)  # graceful stop, as Ctrl-C
        server.wait(timeout=60)
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
    print(f"  {concurrent['tokens_per_s']:.1f} tokens/s aggregate, TTFT p95 {concurrent['ttft_p95_s']:.2f} s, "
          f"{mismatched} of {len(results)} replies differ from single-stream", flush=True)
    return {"single_stream": {"decode_tokens_per_s": single_tps, "ttft_s": single_ttft}, "concurrent": concurrent,
            "speedup_vs_peer": concurrent["tokens_per_s"] / peer["tokens_per_s"],
            "server_start_s": start_up, "server_peak_rss_gb": peak_rss,
            "ok": mismatched == 0 and len(results) == len(prompts)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    from urllib.error import URLError
    from urllib.request import urlopen

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"lmforge serve exited with {server.returncode}; see {log}")
        try:
            with urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"lmforge serve not ready after {timeout:.0f} s; see {log}")


def peak_rss_gb(pid: int) -> float:
    """The server's peak RSS: its own, plus its child processes' (vLLM runs its engine core and worker in child
    processes) — the sum of each process's peak, an upper bound on their peak together."""
    total = 0.0
    for process in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024 ** 2
        except OSError:
            pass
    return total


def descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--peer-requests", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the concurrent phase")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch / llama.cpp threads on every side (default: what lmforge serve uses, cores - 1)")
    parser.add_argument("--decode-dtype", action="append", choices=["auto", "float32", "float16"],
                        help="lmforge's decode_dtype; repeat to measure several in one run (default: float16, "
                             "then float32)")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python",
                        help="python of a venv with vLLM and lmforge (`make vllm`); vLLM is measured when it exists")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()

    from lmforge.model.loader import (
        BUILTIN_MODELS,
        load_model,
        load_tokenizer,
        resolve_model,
    )

    threads = args.threads
    torch.set_num_threads(threads)  # every side gets the same threads: a like-for-like comparison
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch.float32).eval()
    print(f"peer: transformers generate, batch 1, {args.peer_requests} prompts × {args.max_tokens} tokens…",
          flush=True)
    peer = peer_generate(model, tokenizer, PROMPTS[:args.peer_requests], args.max_tokens)
    del model
    print(f"  {peer['tokens_per_s']:.1f} tokens/s, TTFT {peer['ttft_s']:.2f} s", flush=True)

    llama_cpp = peer_llama_cpp(BUILTIN_MODELS["smollm2-135m-instruct"].find_gguf(Path(".")), tokenizer,
                               PROMPTS[:args.peer_requests], args.max_tokens, threads) \
        if args.model == "smollm2-135m-instruct" else None
    if llama_cpp:
        print(f"  llama.cpp: {llama_cpp['decode_tokens_per_s']:.1f} tokens/s, TTFT {llama_cpp['ttft_s']:.2f} s",
              flush=True)
    figures = {
        "machine": {**machine_info(), "threads": threads}, "machine_line": f"{machine_line(machine_info())}, "
                                                                            f"{threads} thread(s) on every side",
        "model": args.model, "max_tokens": args.max_tokens, "peer_generate_batch1": peer,
        "peer_llama_cpp_batch1": llama_cpp or ("not installed (pip install llama-cpp-python)"
                                               if args.model == "smollm2-135m-instruct" else
                                               "not run: the llama.cpp peer uses smollm2-135m-instruct's own GGUF"),
    }
    dtypes = args.decode_dtype or ["float16", "float32"]
    for dtype in dtypes:
        figures[f"lmforge_{dtype}"] = measure_lmforge(args, path, dtype, threads, peer)
    ok = all(figures[f"lmforge_{dtype}"]["ok"] for dtype in dtypes)
    if Path(args.vllm_python).exists():
        figures["vllm_float32"] = measure_lmforge(args, path, "float32", threads, peer, backend="vllm")
        ok = ok and figures["vllm_float32"]["ok"]
    else:
        figures["vllm_float32"] = f"not run: {args.vllm_python} not found (make vllm builds it)"
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
