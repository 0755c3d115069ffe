"""The board's JSON API, part two: what runs after training — eval (one set of weights or every checkpoint),
compare, the side-by-side chat, export, serve — and the jobs list. Each is an `lmforge VERB` child from an argv list;
results are read from the files the verb writes.

Must not load models or serve them in this process.
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from ..errors import UserError
from ..model.loader import BUILTIN_MODELS
from . import runs as runview
from .inputs import (
    FieldErrors,
    body,
    choice_field,
    ctx,
    int_field,
    job_log,
    job_view,
    run_of,
    tail,
    text_field,
)

router = APIRouter(prefix="/api")
OUTPUT_LIMIT = 400_000  # bytes of a job's stdout returned to the page


# --- evaluate, compare, chat, export, serve -----------------------------------------------------------------------
def _test_args(ui, data: dict) -> list[str]:
    test = ui.ws.path(text_field(data, "data", required=True), must_exist=True)
    args = ["--data", ui.ws.relative(test), "--max-new-tokens", str(int_field(data, "max_new_tokens", 64, 1, 4096))]
    if data.get("max_samples") is not None:
        args += ["--max-samples", str(int_field(data, "max_samples", None, 1))]
    return args


@router.post("/runs/{name}/eval")
async def run_eval(request: Request, name: str):
    ui, data = ctx(request), await body(request)
    run_of(ui, name)
    args = ["eval", f"runs/{name}", *_test_args(ui, data)]
    if data.get("all_checkpoints"):
        args.append("--all-checkpoints")
    if data.get("no_generate"):
        args.append("--no-generate")
    return job_view(ui.supervisor.submit("eval", args, job_log(ui.ws, "eval"), run=name), ui.ws)


def _contender(ui, value: Any) -> str:
    """A run name (runs/NAME, or a checkpoint runs/NAME/checkpoints/step-N), a builtin alias, or a local model dir."""
    if not isinstance(value, str) or not value or value.startswith("-"):
        raise FieldErrors([{"path": "models", "message": "each model is a run, a checkpoint or a model name"}])
    label, _, target = value.rpartition("=")
    if target in BUILTIN_MODELS:
        return value
    if label and not label.replace("-", "").replace("_", "").isalnum():
        raise FieldErrors([{"path": "models", "message": f"label {label!r}: letters, digits, - and _"}])
    for candidate in [target] if "/" in target else [f"runs/{target}", target]:
        path = ui.ws.path(candidate)
        if path.exists():
            return f"{label + '=' if label else ''}{ui.ws.relative(path)}"
    raise FieldErrors([{"path": "models", "message": f"{target}: not a run in runs/, a model dir in the workspace or "
                                                     f"a builtin alias ({', '.join(BUILTIN_MODELS)})"}])


@router.post("/compare")
async def compare(request: Request):
    ui, data = ctx(request), await body(request)
    models = data.get("models")
    if not isinstance(models, list) or not 1 <= len(models) <= 8:
        raise FieldErrors([{"path": "models", "message": "a list of 1 to 8 runs or models"}])
    out = ui.ws.path(f"compare/{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    args = ["compare", *[_contender(ui, m) for m in models], "-o", ui.ws.relative(out), *_test_args(ui, data)]
    meta = {"output": ui.ws.relative(out), "report_html": ui.ws.relative(out / "report.html"),
            "compare_json": ui.ws.relative(out / "compare.json")}
    return job_view(ui.supervisor.submit("compare", args, job_log(ui.ws, "compare"), meta=meta), ui.ws)


@router.post("/chat")
async def chat(request: Request):
    """One prompt to several models, each `lmforge chat … --prompt` in its own child; answers are the jobs' stdout."""
    ui, data = ctx(request), await body(request)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 20_000:
        raise FieldErrors([{"path": "prompt", "message": "a message of 1 to 20,000 characters"}])
    models = data.get("models")
    if not isinstance(models, list) or not 1 <= len(models) <= 4:
        raise FieldErrors([{"path": "models", "message": "a list of 1 to 4 runs or models"}])
    jobs = []
    for value in models:
        target = _contender(ui, value).rpartition("=")[2]
        where = ["--model", target] if target in BUILTIN_MODELS or (ui.ws.root / target / "config.json").is_file() \
            else [target]
        args = ["chat", *where, "--prompt", prompt, "--max-new-tokens",
                str(int_field(data, "max_new_tokens", 96, 1, 2048))]
        jobs.append(job_view(ui.supervisor.submit("chat", args, job_log(ui.ws, "chat"), meta={"model": value},
                                                  capture_stdout=True), ui.ws))
    return {"jobs": jobs}


@router.post("/runs/{name}/export")
async def export(request: Request, name: str):
    ui, data = ctx(request), await body(request)
    run_of(ui, name)
    out = ui.ws.path(f"exports/{name}")
    args = ["export", f"runs/{name}", "-o", ui.ws.relative(out), "--overwrite"]
    if data.get("gguf"):
        args += ["--gguf", choice_field(data, "gguf", "q8_0", ("f32", "f16", "q8_0"))]
    if data.get("adapter_only"):
        args.append("--adapter-only")
    if data.get("checkpoint"):
        args += ["--checkpoint", text_field(data, "checkpoint")]
    meta = {"output": ui.ws.relative(out), "manifest": ui.ws.relative(out / "manifest.json")}
    return job_view(ui.supervisor.submit("export", args, job_log(ui.ws, "export"), run=name, meta=meta), ui.ws)


@router.post("/runs/{name}/serve")
async def serve(request: Request, name: str):
    ui, data = ctx(request), await body(request)
    run_of(ui, name)
    target = text_field(data, "target") or f"runs/{name}"
    target = ui.ws.relative(ui.ws.path(target, must_exist=True))
    port = int_field(data, "port", None, 1024, 65535) or _free_port()
    key = f"sk-lmforge-{secrets.token_urlsafe(18)}"
    args = ["serve", target, "--port", str(port), "--api-key", key, "--served-model-name", name]
    meta = {"port": port, "key": key, "base_url": f"http://127.0.0.1:{port}/v1", "model": name}
    return job_view(ui.supervisor.submit("serve", args, job_log(ui.ws, "serve"), run=name, meta=meta), ui.ws)


# --- jobs --------------------------------------------------------------------------------------------------------
@router.get("/jobs")
def jobs(request: Request, kind: str | None = None):
    ui = ctx(request)
    return {"jobs": [job_view(j, ui.ws) for j in ui.supervisor.list(kind)]}


@router.get("/jobs/{job_id}")
def job_detail(request: Request, job_id: str):
    ui = ctx(request)
    job = ui.supervisor.jobs.get(job_id)
    if job is None:
        raise UserError(f"no job {job_id}")
    view = job_view(job, ui.ws)
    view["log_tail"] = tail(Path(job.log), 6000)
    if job.capture_stdout:
        view["output"] = tail(Path(job.log + ".out"), OUTPUT_LIMIT)
    for key in ("manifest", "compare_json", "report_json"):
        if key in job.meta and job.state == "done":
            view[key.replace("_json", "")] = runview.read_json(ui.ws.root / job.meta[key])
    if job.kind == "serve":
        view["ready"] = job.state == "running" and _port_open(job.meta["port"])
    return view


@router.post("/jobs/{job_id}/stop")
def job_stop(request: Request, job_id: str):
    ui = ctx(request)
    job = ui.supervisor.jobs.get(job_id)
    if job is None:
        raise UserError(f"no job {job_id}")
    stop = ui.supervisor.stop if job.kind == "train" else ui.supervisor.terminate
    return job_view(stop(job_id), ui.ws)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
