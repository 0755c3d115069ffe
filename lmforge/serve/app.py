"""The FastAPI app around an engine: `create_app(engine, settings)`, and `run_server` to put it on a socket.

Owns the wiring only: the guard, metrics and routes, the OpenAI error envelope for every error (ours, unknown
routes, bugs), CORS when configured, the worker threads that prepare requests, and the engine's start, supervision
(a dead engine thread stops the server, and run_server returns 1 so a supervisor restarts the process) and graceful
stop with the app's lifespan. Must not hold request logic (routes.py) or policy (guard.py).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import __version__
from .engine import engine_failure
from .guard import Guard
from .metrics import Metrics, MetricsMiddleware
from .ollama import router as ollama_router
from .protocol import ApiError, error_body
from .routes import router
from .settings import ServeSettings

log = logging.getLogger("lmforge.serve")
PREPARE_THREADS = 2  # request preparation (JSON, chat template, tokenizer): bounded, so a flood queues, not spawns


def create_app(engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    guard = Guard.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        watcher = asyncio.create_task(_watch_engine(app))
        yield
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher
        engine.stop()  # uvicorn has already let in-flight requests finish
        app.state.prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # app.openapi() still builds the schema (tests fuzz from it); not published
    app.state.engine, app.state.settings, app.state.guard = engine, settings, guard
    app.state.prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="lmforge-prepare")
    app.state.on_engine_failure = None  # run_server sets it: stop serving
    app.state.metrics = Metrics(engine, guard.kill_switch)
    app.state.retrieval = None
    if settings.kb or settings.kb_per_model:  # serve --kb [NAME=]KB: retrieval-augmented chat (retrieval.py)
        from .retrieval import Retrieval

        app.state.retrieval = Retrieval.for_models(settings, list(engine.models))
    app.include_router(router)
    app.include_router(ollama_router)  # Ollama's /api/* beside the OpenAI API (ollama.py)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = "not_found" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {error.detail}", kind),
                        status_code=error.status_code)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal server error; see the server log", "server_error"), status_code=500)


async def _watch_engine(app: FastAPI, every: float = 0.5) -> None:
    """An engine thread that died (it fails its requests itself) leaves a process that cannot serve: /health says so
    at once, and the server is told to stop, so systemd or Kubernetes restart it."""
    while engine_failure(app.state.engine) is None:
        await asyncio.sleep(every)
    log.critical("the model engine died (%s); stopping the server", app.state.engine.failure)
    if app.state.on_engine_failure is not None:
        app.state.on_engine_failure()


def run_server(engine, settings: ServeSettings) -> int:
    """Serve until Ctrl-C / SIGTERM; then stop accepting, finish in-flight requests, stop the engine. Returns the
    process exit code: 0, or 1 when the engine died (so a supervisor restarts the server)."""
    import uvicorn

    settings.check_bind()
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level="info", timeout_graceful_shutdown=int(settings.request_timeout))
    server = uvicorn.Server(config)
    app.state.on_engine_failure = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the shutdown was already graceful
        pass
    return 1 if engine_failure(engine) is not None else 0
