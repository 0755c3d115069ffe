"""Helpers of the board's tests (no tests here): a real `lmforge ui` in a child process on loopback, a workspace with
a tiny random model and a small dataset in it, and waiting for what the board reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
    for i in range(12)
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_workspace(root: Path, with_model: bool = True) -> Path:
    """root/data/qa.jsonl (12 conversations) and, with_model, root/tiny-llama (a tiny random Llama)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "qa.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    if with_model:
        from conftest import make_tiny_model, tiny_tokenizer

        make_tiny_model("llama", tiny_tokenizer(), root / "tiny-llama")
    return root


class Board:
    def __init__(self, process: subprocess.Popen, url: str, token: str | None, stderr: Path):
        self.process, self.url, self.token, self.stderr = process, url, token, stderr
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url, headers=headers, timeout=30)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def post(self, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
        return self.client.post(path, json=body if body is not None else {}, **kwargs)

    def ok(self, method: str, path: str, body: dict | None = None) -> dict:
        response = self.client.request(method, path, json=body)
        assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def wait_job(self, job_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.ok("GET", f"/api/jobs/{job_id}")
            if job["state"] not in ("queued", "running", "stopping"):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['state']}: {job['log_tail'][-2000:]}"
            time.sleep(0.3)

    def wait_run(self, name: str, predicate, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.ok("GET", f"/api/runs/{name}")
            if predicate(run):
                return run
            assert time.monotonic() < deadline, f"run {name}: {run['status']} step {run['step']}; log: " \
                                                f"{self.get(f'/api/runs/{name}/log').text[-2000:]}"
            time.sleep(0.3)


def tiny_config(name: str, **train) -> dict:
    return {"name": name, "model": {"name_or_path": "tiny-llama"}, "data": {"train": ["data/qa.jsonl"],
            "cutoff_len": 128}, "train": {"max_steps": 3, "logging_steps": 1, "batch_size": 2, **train}}


@contextmanager
def board(workspace: Path, *args: str, token: str | None = None, port: int | None = None):
    """`lmforge ui --workspace W --port P ARGS…` in a child process; yields a Board once /api/info answers; stops it
    with Ctrl-C (SIGINT) afterwards."""
    port = port or free_port()
    stderr = workspace / f".board-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "lmforge", "ui", "--workspace", str(workspace), "--port", str(port), *args]
    if token:
        argv += ["--auth-token", token]
    with stderr.open("wb") as err:
        process = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/api/info", headers=headers, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"lmforge ui did not start: {stderr.read_text()[-3000:]}")
        time.sleep(0.2)
    live = Board(process, url, token, stderr)
    try:
        yield live
    finally:
        live.client.close()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def stop_all_trainings(workspace: Path) -> None:
    """Test hygiene: SIGINT any training child a board left running in this workspace (its ui_job.json pid)."""
    for path in (workspace / "runs").glob("*/ui_job.json"):
        job = json.loads(path.read_text())
        if job.get("pid") and job.get("state") in ("running", "stopping"):
            try:
                os.kill(job["pid"], signal.SIGINT)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(job["pid"], 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
