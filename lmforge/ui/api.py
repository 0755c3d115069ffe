"""The board's JSON API, part one: the workspace, data preparation, configs and runs (start, stop, resume, the
SSE stream of a run's metrics). Work is done by `lmforge VERB` children (jobs.py); what a run looks like is read from
its run dir (runs.py); evaluation, comparison, chat, export and serving are api_jobs.py's.

Owns: the argv of each verb it starts (lists, never shell strings), config validation by field against the pydantic
schema. Must not train, evaluate, export or serve in this process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import secrets
import threading
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
from .inputs import (
    JOBS_DIR,
    FieldErrors,
    body,
    choice_field,
    ctx,
    int_field,
    job_log,
    job_view,
    run_of,
    size_field,
    text_field,
)
from .jobs import TRAIN_LOG
from .workspace import PathRefused, Workspace

router = APIRouter(prefix="/api")


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
    if media == "text/html" and getattr(request.state, "token_in_url", False):
        raise PathRefused(f"{path}: an HTML page is not opened with the token in its address (the page could read "
                          f"it); the board shows reports inline")
    # a report page runs sandboxed (an origin of its own): its scripts cannot read the board's token or call its API
    headers = {"Content-Security-Policy": "sandbox allow-scripts; default-src 'none'; img-src data:; "
                                          "style-src 'unsafe-inline'; script-src 'unsafe-inline'"} \
        if media == "text/html" else {}
    return FileResponse(target, media_type=media, headers=headers)


# --- data --------------------------------------------------------------------------------------------------------
@router.post("/data/inspect")
async def data_inspect(request: Request):
    ui, data = ctx(request), await body(request)
    path = ui.ws.path(text_field(data, "path", required=True), must_exist=True)
    args = ["data", "inspect", ui.ws.relative(path), "--json", "--samples", str(int_field(data, "samples", 3, 1, 20)),
            "--cutoff-len", str(int_field(data, "cutoff_len", 1024, 1, 1_000_000)),
            "--train-on", choice_field(data, "train_on", "assistant", ("assistant", "last_assistant", "all"))]
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
    args = ["data", "split", ui.ws.relative(source), "--val", size_field(data, "val", "0.05"),
            "--test", size_field(data, "test", "0"), "--seed", str(int_field(data, "seed", 0))]
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
    result = await asyncio.to_thread(_estimate_once, str(model_dir), config.model_dump_json(), tokens, measured)
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


@router.get("/runs/{name}")
def run_detail(request: Request, name: str):
    ui = ctx(request)
    run = run_of(ui, name)
    job = ui.supervisor.training_of(name)
    return {**runview.summary(run, job, detail=True),
            "queue_position": ui.supervisor.queue_position(job) if job else None}


@router.post("/runs/{name}/stop")
def stop_run(request: Request, name: str):
    ui = ctx(request)
    run_of(ui, name)
    job = ui.supervisor.training_of(name)
    if job is None or not job.active:
        raise UserError(f"run {name} is not running")
    return job_view(ui.supervisor.stop(job.id), ui.ws)


@router.post("/runs/{name}/resume")
def resume_run(request: Request, name: str):
    ui = ctx(request)
    run = run_of(ui, name)
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
    records, lines = runview.read_metrics(run_of(ctx(request), name))
    return {"records": records, "lines": lines}


@router.get("/runs/{name}/log")
def run_log(request: Request, name: str):
    return PlainTextResponse(runview.log_tail(run_of(ctx(request), name)))


@router.get("/runs/{name}/config.yaml")
def run_config(request: Request, name: str):
    run = run_of(ctx(request), name)
    return PlainTextResponse(run.config.read_text(encoding="utf-8"), media_type="application/x-yaml",
                             headers={"Content-Disposition": f'attachment; filename="{name}.yaml"'})


@router.get("/runs/{name}/stream")
async def run_stream(request: Request, name: str):
    """Server-sent events: `metrics` (new metrics.jsonl records, id = lines read) and `status` (the run summary
    when it changes). Resumes after Last-Event-ID."""
    ui = ctx(request)
    run = run_of(ui, name)
    start = request.headers.get("last-event-id", "0")
    start = int(start) if start.isdigit() else 0

    async def events():
        offset, last_status = start, None
        yield "retry: 2000\n\n"
        while not ui.closing.is_set() and not await request.is_disconnected():
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


# --- helpers ---------------------------------------------------------------------------------------------------------
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


@functools.lru_cache(maxsize=64)
def _estimate_once(model_dir: str, config_json: str, tokens: float | None, measured: float | None) -> dict:
    """The page asks again on every edit: one estimate per distinct input, one at a time."""
    with _ESTIMATE_LOCK:
        return estimator.estimate(model_dir, Config.model_validate_json(config_json), tokens, measured)


_ESTIMATE_LOCK = threading.Lock()


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
