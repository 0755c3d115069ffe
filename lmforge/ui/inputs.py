"""What the board's routes share: reading a request (JSON body, fields with their path in every error), the
workspace and the supervisor behind a request, and how a job is shown. Must not define routes.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from fastapi import Request

from ..errors import UserError
from ..rundir import RunDir
from .jobs import Job
from .runs import terminal_text
from .workspace import Workspace

JOBS_DIR = ".lmforge-ui"  # job logs, edited recipes


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


def choice_field(data: dict, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = data.get(key, default)
    if value not in allowed:
        raise FieldErrors([{"path": key, "message": f"one of {', '.join(allowed)}"}])
    return value


def size_field(data: dict, key: str, default: str) -> str:
    value = str(data.get(key, default))
    try:
        if float(value) < 0:
            raise ValueError
    except ValueError:
        raise FieldErrors([{"path": key, "message": "a fraction below 1 or a record count"}]) from None
    return value


def tail(path: Path, limit: int) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - limit))
        return terminal_text(handle.read().decode("utf-8", errors="replace"))


def run_of(ui, name: str) -> RunDir:
    run = RunDir(ui.ws.run_dir(name))
    if not run.config.is_file():
        raise UserError(f"no run named {name} in {ui.ws.runs_dir}")
    return run
