"""`lmforge ui`: the app — settings, the guard in front of the API, the page, and the server.

Owns: who may call the API (loopback by default; any other address needs a token, checked on every /api call and
SSE stream in constant time; a request whose Host or Origin is not this server is refused, so another web site open in
the same browser cannot drive a loopback board), error envelopes ({"error", "errors"}), and serving the one page with
its vendored chart library. Must not do work itself: routes are api.py's, children jobs.py's.
"""

from __future__ import annotations

import hmac
import ipaddress
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ..errors import ConfigError, UserError
from .api import router
from .api_jobs import router as jobs_router
from .inputs import FieldErrors
from .jobs import Supervisor
from .workspace import PathRefused, UploadTooLarge, Workspace

STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class UISettings:
    workspace: str = "."
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    max_runs: int = 1
    max_upload_bytes: int = 200 * 2**20
    stream_interval: float = 0.5  # seconds between looks at metrics.jsonl for the SSE stream

    def check_bind(self) -> None:
        if not self.token and not is_loopback(self.host):
            raise ConfigError(f"refusing to listen on {self.host} without --auth-token (or --auth-token-file): "
                              f"anyone who can reach it could start processes on this machine. Add a token, or "
                              f"keep the default --host 127.0.0.1")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("the auth token is too short: use at least 16 characters (e.g. "
                              "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise UserError(f"--auth-token-file {path}: {error.strerror}") from None
    if not token:
        raise UserError(f"--auth-token-file {path} is empty: put the token on its first line")
    return token.splitlines()[0].strip()


class BoardState:
    def __init__(self, settings: UISettings):
        self.settings = settings
        self.ws = Workspace(settings.workspace)
        self.supervisor = Supervisor(self.ws.root, settings.max_runs)
        self.closing = threading.Event()  # set on Ctrl-C / SIGTERM: SSE streams end so the server can stop


def create_app(settings: UISettings) -> FastAPI:
    settings.check_bind()
    state = BoardState(settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        for job in state.supervisor.close():
            print(f"training {job.run} continues in the background (pid {job.pid}); the next `lmforge ui` in this "
                  f"workspace shows it, or stop it with: kill -INT {job.pid}", file=sys.stderr)

    app = FastAPI(title="lmforge ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.ui = state

    @app.middleware("http")
    async def guard(request: Request, call_next):
        problem = _refusal(request, settings)
        if problem:
            return JSONResponse({"error": problem[1]}, status_code=problem[0])
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(FieldErrors)
    async def field_errors(request: Request, error: FieldErrors):
        return JSONResponse({"error": str(error), "errors": error.errors}, status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError):
        status = 403 if isinstance(error, PathRefused) else 413 if isinstance(error, UploadTooLarge) else 400
        return JSONResponse({"error": str(error)}, status_code=status)

    app.include_router(router)
    app.include_router(jobs_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP})

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    return app


CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")


def _refusal(request: Request, settings: UISettings) -> tuple[int, str] | None:
    host = request.headers.get("host", "")
    if not _host_allowed(host, settings):
        return 421, f"unexpected Host header {host!r}: open the board at the address it listens on"
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != host:  # "null" too: a sandboxed report page is not the board
        return 403, f"requests from {origin} are refused: the board answers its own page only"
    if not request.url.path.startswith("/api") or not settings.token:
        return None
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("token", "")
    request.state.token_in_url = not header  # EventSource and <img> cannot send headers; api.py limits what it opens
    if not hmac.compare_digest(given.encode(), settings.token.encode()):
        return 401, "missing or wrong token: give it as 'Authorization: Bearer TOKEN' (the page asks for it)"
    return None


def _host_allowed(host: str, settings: UISettings) -> bool:
    """Against DNS rebinding: a loopback board answers only to loopback names; a board on another address (which
    has a token) to any name."""
    if settings.token and not is_loopback(settings.host):
        return True
    name = urlsplit(f"//{host}").hostname or ""
    return name in ("localhost", "::1") or name.startswith("127.")


def run_board(settings: UISettings) -> None:
    import uvicorn

    app = create_app(settings)
    where = f"http://{settings.host if ':' not in settings.host else f'[{settings.host}]'}:{settings.port}/"
    print(f"lmforge ui: {where}  (workspace {app.state.ui.ws.root}; Ctrl-C stops the board)", file=sys.stderr)
    class BoardServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.ui.closing.set()
            super().handle_exit(sig, frame)

    try:
        BoardServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                   timeout_graceful_shutdown=5)).run()
    except KeyboardInterrupt:
        pass
