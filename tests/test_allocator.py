"""The CLI runs its tensor verbs on jemalloc where the system has it (lmforge/allocator.py): a real `lmforge train`
re-executes itself with jemalloc preloaded, says so, trains to exactly the losses of the same run on glibc malloc,
and `LMFORGE_ALLOCATOR=system` keeps glibc. Errors keep their message and exit code 2 through the re-exec. oneDNN's
per-shape kernel caches are bounded, so new matmul shapes stop adding memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge import allocator

ROOT = Path(__file__).resolve().parents[1]
JEMALLOC = allocator.find_jemalloc()
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc.so.2 is not installed on this machine "
                                    "(Debian / Ubuntu: apt install libjemalloc2)")


def test_the_environment_preloads_jemalloc_first_and_keeps_the_rest():
    env = allocator.environment_with_jemalloc({"LD_PRELOAD": "/x/libother.so", "A": "1"}, library="/l/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/l/libjemalloc.so.2 /x/libother.so"
    assert env["A"] == "1" and env[allocator.ENV_DONE] == "1"
    again = allocator.environment_with_jemalloc(env, library="/l/libjemalloc.so.2")
    assert again["LD_PRELOAD"] == env["LD_PRELOAD"]  # never preloaded twice


@pytest.mark.parametrize("choice", ["system", "glibc", "off"])
def test_the_user_can_keep_the_system_allocator(choice):
    assert allocator.environment_with_jemalloc({allocator.ENV_CHOICE: choice}, library="/l/libjemalloc.so.2") is None


def torch_bf16_on_onednn() -> bool:
    import torch
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def lmforge(*args: str, **env) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items()
               if key not in ("LD_PRELOAD", allocator.ENV_DONE, allocator.ENV_CHOICE)}
    environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=300)


def train(tmp_path: Path, model_dir: str, name: str, **env) -> tuple[subprocess.CompletedProcess, list[float]]:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n" for i in range(8)),
            encoding="utf-8")
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "model": {"name_or_path": model_dir, "dtype": "float32"},
        "method": {"type": "lora", "lora_dropout": 0.0}, "data": {"train": [str(data)]},
        "train": {"output_dir": str(out), "logging_steps": 1, "learning_rate": 1e-2, "max_steps": 3,
                  "batch_size": 2, "lr_scheduler_type": "constant"}}), encoding="utf-8")
    result = lmforge("train", str(config), **env)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return result, [r["loss"] for r in records if "loss" in r]


@needs_jemalloc
def test_train_runs_on_jemalloc_and_learns_exactly_what_glibc_learns(tmp_path, tiny_model_dir):
    on_jemalloc, jemalloc_losses = train(tmp_path, tiny_model_dir, "jemalloc")
    on_glibc, glibc_losses = train(tmp_path, tiny_model_dir, "glibc", LMFORGE_ALLOCATOR="system")
    assert "memory allocator: jemalloc" in on_jemalloc.stdout
    assert "memory allocator: glibc malloc" in on_glibc.stdout
    assert len(jemalloc_losses) == 3 and jemalloc_losses == glibc_losses


@needs_jemalloc
def test_an_error_keeps_its_message_and_exit_code_through_the_reexec(tmp_path):
    result = lmforge("train", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr


def test_kernel_caches_are_bounded_unless_the_user_set_them():
    env = {"LRU_CACHE_CAPACITY": "512"}
    allocator.bound_kernel_caches(env)
    assert env == {"LRU_CACHE_CAPACITY": "512", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": allocator.KERNEL_CACHE_CAPACITY}


def test_tensor_verbs_bound_the_kernel_caches_before_they_run(tmp_path, monkeypatch):
    from lmforge import cli
    for name in allocator.KERNEL_CACHE_VARIABLES:  # set then removed, so that monkeypatch restores them afterwards
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert all(os.environ[name] == allocator.KERNEL_CACHE_CAPACITY for name in allocator.KERNEL_CACHE_VARIABLES)


NEW_SHAPES = """
import sys, torch
from pathlib import Path
from lmforge.allocator import bound_kernel_caches
if sys.argv[1] == "bounded":
    bound_kernel_caches()  # after torch's import, before the first matmul: as cli.py does
def rss_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024
torch.set_num_threads(1)
weight = torch.randn(64, 64, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(1, 64, dtype=torch.bfloat16), weight)
start = rss_mib()
for rows in range(2, 602):  # a new matmul shape each time, as a packed row of a new length brings
    torch.nn.functional.linear(torch.randn(rows, 64, dtype=torch.bfloat16), weight)
print(rss_mib() - start)
"""


@pytest.mark.skipif(not torch_bf16_on_onednn(), reason="bf16 matmuls do not run through oneDNN on this CPU (no "
                    "AVX-512 bf16 support), so its kernel caches do not fill")
def test_bounded_kernel_caches_stop_memory_growing_with_every_new_matmul_shape():
    environ = {key: value for key, value in os.environ.items() if key not in allocator.KERNEL_CACHE_VARIABLES}
    growth = {}
    for mode in ("bounded", "as_shipped"):
        result = subprocess.run([sys.executable, "-c", NEW_SHAPES, mode], cwd=ROOT, env=environ, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        growth[mode] = float(result.stdout.split()[-1])
    # 600 shapes on the Zen 4 of benchmarks/RESULTS.md: ~330-390 MiB with 1,024 kernels per cache, ~75-120 with 128
    assert growth["bounded"] < growth["as_shipped"] / 2, growth
