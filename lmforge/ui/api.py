"""The board's JSON API: every action of the page, each a small route. Work is done by `lmforge VERB` children
(jobs.py); what a run looks like is read from its run dir (runs.py).

Owns: request validation (paths through workspace.py, configs through the pydantic schema, errors by field), the argv
of each verb (lists, never shell strings), and the SSE stream of a run's metrics. Must not train, evaluate, export or
serve in this process.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from .. import __version__
from ..config import Config
from ..config.schema import METHODS, STAGES
from ..data.outputs import sibling_path
from ..errors import UserError
from ..model.loader import BUILTIN_MODELS, is_trusted, list_models, models_dir
from ..rundir import RunDir, complete_checkpoints
from . import estimate as estimator
from . import runs as runview
from .jobs import TRAIN_LOG, Job
from .workspace import Workspace

router = APIRouter(prefix="/api")
JOBS_DIR = ".lmforge-ui"  # job logs, edited recipes
OUTPUT_LIMIT = 400_000  # bytes of a job's stdout returned to the page


class FieldErrors(UserError):
    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{e['path']}: {e['message']}" for e in errors))
        self.errors = errors


def ctx(request: Request):
    return request.app.state.ui


async def body(request: Request) -> dict:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise UserError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise UserError("the request body must be a JSON object")
    return data


def text_field(data: dict, key: str, default: str | None = None, *, required: bool = False) -> str | None:
    value = data.get(key, default)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or value.startswith("-"):
        raise FieldErrors([{"path": key, "message": "expected a non-empty text not starting with '-'"}])
    return value


def int_field(data: dict, key: str, default: int | None, low: int = 0, high: int = 10**7) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FieldErrors([{"path": key, "message": f"expected a whole number from {low} to {high}"}])
    return value


def job_log(ws: Workspace, kind: str) -> Path:
    return ws.root / JOBS_DIR / "jobs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(3)}.log"


def job_view(job: Job, ws: Workspace) -> dict:
    view = job.to_dict()
    view["log"] = ws.relative(Path(job.log)) if Path(job.log).is_relative_to(ws.root) else job.log
    return view


# --- the workspace and the schema ----------------------------------------------------------------------------------
@router.get("/info")
def info(request: Request):
    ui = ctx(request)
    local = [ui.ws.relative(p.parent) for p in ui.ws.root.glob("*/config.json")
             if (p.parent / "tokenizer_config.json").is_file()]
    return {"version": __version__, "workspace": str(ui.ws.root), "max_runs": ui.supervisor.max_runs,
            "auth": bool(ui.settings.token), "upload_limit": ui.settings.max_upload_bytes,
            "models": list_models(), "local_models": local, "methods": list(METHODS), "stages": list(STAGES),
            "datasets": ui.ws.data_files()}


@router.get("/schema")
def schema():
    return Config.model_json_schema()


@router.get("/files")
def files(request: Request):
    return {"files": ctx(request).ws.data_files()}


@router.put("/files/upload")
async def upload(request: Request, name: str):
    ui = ctx(request)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > ui.settings.max_upload_bytes:
        return JSONResponse({"error": f"upload {name} is {int(length):,} bytes, over the limit of "
                                      f"{ui.settings.max_upload_bytes:,}"}, status_code=413)
    writer = ui.ws.upload(name, ui.settings.max_upload_bytes)
    try:
        async for chunk in request.stream():
            writer.write(chunk)
    except BaseException:
        writer.abandon()
        raise
    path = writer.commit()
    return {"path": ui.ws.relative(path), "bytes": path.stat().st_size}


MEDIA = {".html": "text/html", ".png": "image/png", ".json": "application/json", ".jsonl": "text/plain",
         ".md": "text/plain", ".yaml": "text/plain", ".txt": "text/plain", ".log": "text/plain",
         ".csv": "text/plain", ".tsv": "text/plain", "": "text/plain"}


@router.get("/files/raw")
def raw_file(request: Request, path: str):
    target = ctx(request).ws.path(path, must_exist=True)
    if not target.is_file():
        raise UserError(f"{path} is not a file")
    media = MEDIA.get(target.suffix.lower(), "application/octet-stream")
    headers = {"Content-Security-Policy": "default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'; "
                                          "script-src 'unsafe-inline'"} if media == "text/html" else {}
    return FileResponse(target, media_type=media, headers=headers)


# --- data --------------------------------------------------------------------------------------------------------
@router.post("/data/inspect")
async def data_inspect(request: Request):
    ui, data = ctx(request), await body(request)
    path = ui.ws.path(text_field(data, "path", required=True), must_exist=True)
    args = ["data", "inspect", ui.ws.relative(path), "--json", "--samples", str(int_field(data, "samples", 3, 1, 20)),
            "--cutoff-len", str(int_field(data, "cutoff_len", 1024, 1, 1_000_000)),
            "--train-on", _choice(data, "train_on", "assistant", ("assistant", "last_assistant", "all"))]
    if data.get("model"):
        args += ["--model", _model_arg(ui.ws, text_field(data, "model"))]
    return job_view(ui.supervisor.submit("inspect", args, job_log(ui.ws, "inspect"), capture_stdout=True), ui.ws)


@router.post("/data/clean")
async def data_clean(request: Request):
    ui, data = ctx(request), await body(request)
    source = ui.ws.path(text_field(data, "path", required=True), must_exist=True)
    output = ui.ws.path(text_field(data, "output") or str(sibling_path(source, "clean.jsonl")))
    args = ["data", "clean", ui.ws.relative(source), "-o", ui.ws.relative(output)]
    if data.get("recipe"):
        recipe_text = text_field(data, "recipe")
        try:
            yaml.safe_load(recipe_text)
        except yaml.YAMLError as error:
            raise FieldErrors([{"path": "recipe", "message": f"invalid YAML: {error}"}]) from None
        recipe = ui.ws.root / JOBS_DIR / "recipes" / f"recipe-{secrets.token_hex(4)}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(recipe_text, encoding="utf-8")
        args += ["--recipe", ui.ws.relative(recipe)]
    meta = {"output": ui.ws.relative(output), "report_html": ui.ws.relative(sibling_path(output, "report.html")),
            "report_json": ui.ws.relative(sibling_path(output, "report.json"))}
    return job_view(ui.supervisor.submit("clean", args, job_log(ui.ws, "clean"), meta=meta), ui.ws)


@router.get("/data/recipe")
def default_recipe():
    """The built-in clean recipe as YAML, for the page to show and edit."""
    from ..data.recipe import DEFAULT_RECIPE

    return PlainTextResponse(yaml.safe_dump({"steps": DEFAULT_RECIPE}, sort_keys=False, allow_unicode=True))


@router.post("/data/split")
async def data_split(request: Request):
    ui, data = ctx(request), await body(request)
    source = ui.ws.path(text_field(data, "path", required=True), must_exist=True)
    args = ["data", "split", ui.ws.relative(source), "--val", _size(data, "val", "0.05"),
            "--test", _size(data, "test", "0"), "--seed", str(int_field(data, "seed", 0))]
    meta = {name: ui.ws.relative(sibling_path(source, f"{name}.jsonl")) for name in ("train", "val", "test")}
    return job_view(ui.supervisor.submit("split", args, job_log(ui.ws, "split"), meta=meta), ui.ws)


# --- configs and runs ---------------------------------------------------------------------------------------------
def validate_config(raw: Any) -> Config:
    if not isinstance(raw, dict):
        raise FieldErrors([{"path": "config", "message": "expected an object with sections model, method, …"}])
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise FieldErrors([{"path": ".".join(str(p) for p in e["loc"]) or "config",
                            "message": e["msg"].removeprefix("Value error, ")} for e in exc.errors()]) from None
    if config.train.output_dir:
        raise FieldErrors([{"path": "train.output_dir", "message": "the board keeps every run in runs/<name>: "
                                                                   "leave it empty and choose the name"}])
    return config


@router.post("/config/preview")
async def config_preview(request: Request):
    """The YAML a config will run as, or its problems by field (HTTP 422)."""
    data = await body(request)
    config = validate_config(data.get("config"))
    ctx(request).ws.run_name(config.name)
    return {"yaml": config.to_yaml()}


@router.post("/estimate")
async def estimate(request: Request):
    ui, data = ctx(request), await body(request)
    config = validate_config(data.get("config"))
    model_dir = _model_dir(ui.ws, config.model.name_or_path)
    tokens = data.get("tokens_per_example")
    tokens = float(tokens) if isinstance(tokens, (int, float)) and tokens > 0 else None
    measured, source_run = _measured_speed(ui.ws, config)
    dumped = config.model_dump(mode="json")
    result = await asyncio.to_thread(estimator.estimate, model_dir, dumped, tokens, measured)
    return {**estimator.with_steps(result, _planned_steps(ui.ws, config)), "measured_by": source_run}


@router.get("/runs")
def list_runs(request: Request):
    ui = ctx(request)
    return {"runs": [runview.summary(RunDir(p), ui.supervisor.training_of(p.name)) for p in ui.ws.list_runs()]}


@router.post("/runs")
async def start_run(request: Request):
    ui, data = ctx(request), await body(request)
    config = validate_config(data.get("config"))
    name = ui.ws.run_name(config.name)
    run = RunDir(ui.ws.run_dir(name))
    job = ui.supervisor.training_of(name)
    if job is not None and job.active:
        raise UserError(f"run {name} is already {job.state}; stop it first or choose another name")
    run.check_free(config.train.overwrite_output_dir, resuming=bool(config.train.resume_from_checkpoint))
    run.root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(config.to_yaml(), encoding="utf-8")
    (run.root / TRAIN_LOG).unlink(missing_ok=True)
    job = ui.supervisor.submit("train", ["train", f"runs/{name}/config.yaml"], run.root / TRAIN_LOG, run=name)
    return {"run": name, "job": job_view(job, ui.ws), "queue_position": ui.supervisor.queue_position(job)}


def _run(ui, name: str) -> RunDir:
    run = RunDir(ui.ws.run_dir(name))
    if not run.config.is_file():
        raise UserError(f"no run named {name} in {ui.ws.runs_dir}")
    return run


@router.get("/runs/{name}")
def run_detail(request: Request, name: str):
    ui = ctx(request)
    run = _run(ui, name)
    job = ui.supervisor.training_of(name)
    return {**runview.summary(run, job, detail=True),
            "queue_position": ui.supervisor.queue_position(job) if job else None}


@router.post("/runs/{name}/stop")
def stop_run(request: Request, name: str):
    ui = ctx(request)
    _run(ui, name)
    job = ui.supervisor.training_of(name)
    if job is None or not job.active:
        raise UserError(f"run {name} is not running")
    return job_view(ui.supervisor.stop(job.id), ui.ws)


@router.post("/runs/{name}/resume")
def resume_run(request: Request, name: str):
    ui = ctx(request)
    run = _run(ui, name)
    job = ui.supervisor.training_of(name)
    if job is not None and job.active:
        raise UserError(f"run {name} is already {job.state}")
    found = complete_checkpoints(run)
    if not found:
        raise UserError(f"run {name} has no complete checkpoint to resume from")
    step = int(found[-1].name.removeprefix("step-"))
    job = ui.supervisor.submit("train", ["train", f"runs/{name}/config.yaml", "train.resume_from_checkpoint=latest"],
                               run.root / TRAIN_LOG, run=name, meta={"start_step": step})
    return {"run": name, "job": job_view(job, ui.ws), "queue_position": ui.supervisor.queue_position(job)}


@router.get("/runs/{name}/metrics")
def run_metrics(request: Request, name: str):
    records, lines = runview.read_metrics(_run(ctx(request), name))
    return {"records": records, "lines": lines}


@router.get("/runs/{name}/log")
def run_log(request: Request, name: str):
    return PlainTextResponse(runview.log_tail(_run(ctx(request), name)))


@router.get("/runs/{name}/config.yaml")
def run_config(request: Request, name: str):
    run = _run(ctx(request), name)
    return PlainTextResponse(run.config.read_text(encoding="utf-8"), media_type="application/x-yaml",
                             headers={"Content-Disposition": f'attachment; filename="{name}.yaml"'})


@router.get("/runs/{name}/stream")
async def run_stream(request: Request, name: str):
    """Server-sent events: `metrics` (new metrics.jsonl records, id = lines read) and `status` (the run summary
    when it changes). Resumes after Last-Event-ID."""
    ui = ctx(request)
    run = _run(ui, name)
    start = request.headers.get("last-event-id", "0")
    start = int(start) if start.isdigit() else 0

    async def events():
        offset, last_status = start, None
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            records, offset_now = runview.read_metrics(run, offset)
            if records:
                offset = offset_now
                yield f"id: {offset}\nevent: metrics\ndata: {json.dumps(records)}\n\n"
            elif offset_now < offset:
                offset = 0
            summary = runview.summary(run, ui.supervisor.training_of(name))
            summary.pop("updated", None)
            eta = summary.pop("eta_seconds", None)
            text = json.dumps(summary, sort_keys=True)
            if text != last_status:
                last_status = text
                yield f"event: status\ndata: {json.dumps({**summary, 'eta_seconds': eta})}\n\n"
            await asyncio.sleep(ui.settings.stream_interval)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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
    _run(ui, name)
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
    _run(ui, name)
    out = ui.ws.path(f"exports/{name}")
    args = ["export", f"runs/{name}", "-o", ui.ws.relative(out), "--overwrite"]
    if data.get("gguf"):
        args += ["--gguf", _choice(data, "gguf", "q8_0", ("f32", "f16", "q8_0"))]
    if data.get("adapter_only"):
        args.append("--adapter-only")
    if data.get("checkpoint"):
        args += ["--checkpoint", text_field(data, "checkpoint")]
    meta = {"output": ui.ws.relative(out), "manifest": ui.ws.relative(out / "manifest.json")}
    return job_view(ui.supervisor.submit("export", args, job_log(ui.ws, "export"), run=name, meta=meta), ui.ws)


@router.post("/runs/{name}/serve")
async def serve(request: Request, name: str):
    ui, data = ctx(request), await body(request)
    _run(ui, name)
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
    view["log_tail"] = _tail(Path(job.log), 6000)
    if job.capture_stdout:
        view["output"] = _tail(Path(job.log + ".out"), OUTPUT_LIMIT)
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


# --- helpers -----------------------------------------------------------------------------------------------------
def _choice(data: dict, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = data.get(key, default)
    if value not in allowed:
        raise FieldErrors([{"path": key, "message": f"one of {', '.join(allowed)}"}])
    return value


def _size(data: dict, key: str, default: str) -> str:
    value = str(data.get(key, default))
    try:
        if float(value) < 0:
            raise ValueError
    except ValueError:
        raise FieldErrors([{"path": key, "message": "a fraction below 1 or a record count"}]) from None
    return value


def _model_arg(ws: Workspace, name: str) -> str:
    return name if name in BUILTIN_MODELS else ws.relative(ws.path(name, must_exist=True))


def _model_dir(ws: Workspace, name: str) -> Path:
    if name in BUILTIN_MODELS:
        path = models_dir() / name
        if not is_trusted(path):
            raise UserError(f"{name} is not cached yet: run `lmforge models` or start a run once (it converts the "
                            f"bundled file), then estimate")
        return path
    path = ws.path(name, must_exist=True)
    if not (path / "config.json").is_file():
        raise FieldErrors([{"path": "model.name_or_path", "message": f"{name}: not a model dir (no config.json)"}])
    return path


def _measured_speed(ws: Workspace, config: Config) -> tuple[float | None, str | None]:
    """Median tokens/s of the newest run in the workspace that trained this model with this method."""
    for path in ws.list_runs():
        other = runview.read_config(RunDir(path))
        if (other.get("model") or {}).get("name_or_path") != config.model.name_or_path or \
                (other.get("method") or {}).get("type") != config.method.type:
            continue
        records, _ = runview.read_metrics(RunDir(path))
        speeds = sorted(r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float)))
        if speeds:
            return speeds[len(speeds) // 2], path.name
    return None, None


def _planned_steps(ws: Workspace, config: Config) -> int | None:
    """max_steps, or epochs × steps per epoch when every training file is a JSONL file in the workspace (one record
    a line); None when it depends on more than that (dataset names, JSON arrays, val_size, cleaning)."""
    if config.train.max_steps > 0:
        return config.train.max_steps
    records = 0
    for name in config.data.train:
        try:
            path = ws.path(name)
        except UserError:
            return None
        if path.suffix != ".jsonl" or not path.is_file() or path.stat().st_size > 200 * 2**20:
            return None
        with path.open("rb") as handle:
            records += sum(1 for line in handle if line.strip())
    if config.data.max_samples:
        records = min(records, config.data.max_samples * len(config.data.train))
    if config.data.val_size:
        records -= int(config.data.val_size if config.data.val_size >= 1 else config.data.val_size * records)
    per_step = config.train.batch_size * config.train.gradient_accumulation_steps
    return max(1, math.ceil(math.ceil(max(records, 1) / per_step) * config.train.num_train_epochs))


def _tail(path: Path, limit: int) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - limit))
        return handle.read().decode("utf-8", errors="replace").replace("\r", "\n")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
