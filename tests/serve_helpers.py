"""Helpers for the serve tests (no tests here): a tiny model with prompt-dependent greedy output, LoRA adapters,
a live server.

A tiny model at its default init (std 0.02) answers every prompt with the same token; with std 0.3 weights its
greedy replies differ per prompt and per adapter, so comparisons between paths can fail when something is wrong.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch


def vivid_tiny_model(kind: str, tokenizer, out_dir: Path, seed: int = 0) -> str:
    from conftest import make_tiny_model
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(kind, tokenizer, out_dir, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            elif parameter.dim() == 1 and parameter.abs().sum() > 0 and not torch.all(parameter == 1):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)  # biases (qwen2)
    model.save_pretrained(path)
    return path


def make_adapter(base_dir: str, out_dir: Path, targets: list[str], seed: int, rank: int = 4) -> str:
    """A LoRA adapter with random (non-zero) B, so it changes the model's output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(out_dir)
    return str(out_dir)


@contextmanager
def live_server(app):
    """The app under uvicorn on 127.0.0.1 at a free port, in a thread; yields the base URL. Graceful stop."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(60)


def http(method: str, url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict, str]:
    """(status, headers, body text) — plain urllib, for endpoints the openai client does not cover."""
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def wait_steps(engine, condition, steps: int) -> bool:
    """Wait until `condition()` holds, for at most `steps` engine iterations (a bound in work, not in seconds; the
    wall-clock cap only guards against a hung engine)."""
    start, hang_guard = engine.steps, time.monotonic() + 300
    while not condition():
        if engine.steps - start > steps or time.monotonic() > hang_guard:
            return condition()
        time.sleep(0.005)
    return True
