"""The FastAPI app around an engine: `create_app(engine, settings)`, and `run_server` to put it on a socket.

Owns the wiring only: the guard, metrics and routes, the OpenAI error envelope for every error (ours, unknown
routes, bugs), CORS when configured, and the engine's start and graceful stop with the app's lifespan.
Must not hold request logic (routes.py) or policy (guard.py).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import __version__
from .guard import Guard
from .metrics import Metrics, MetricsMiddleware
from .protocol import ApiError, error_body
from .routes import router
from .settings import ServeSettings

log = logging.getLogger("lmforge.serve")


def create_app(engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    guard = Guard.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        yield
        engine.stop()  # uvicorn has already let in-flight requests finish

    app = FastAPI(title="lmforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine, app.state.settings, app.state.guard = engine, settings, guard
    app.state.metrics = Metrics(engine, guard.kill_switch)
    app.include_router(router)
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


def run_server(engine, settings: ServeSettings) -> None:
    """Serve until Ctrl-C / SIGTERM; then stop accepting, finish in-flight requests, stop the engine."""
    import uvicorn

    settings.check_bind()
    config = uvicorn.Config(create_app(engine, settings), host=settings.host, port=settings.port,
                            log_level="info", timeout_graceful_shutdown=int(settings.request_timeout))
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the shutdown was already graceful
        pass
