"""Builds one ASGI app from the services this process serves."""

from __future__ import annotations

import gc
import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from tenfold import __version__
from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.http import (
    EdgeMiddleware,
    Problem,
    document_problems,
    install_problem_handlers,
)
from tenfold.kernel.runtime import Mount, Runtime, ensure_admin_key
from tenfold.kernel.telemetry import configure_logging, render_metrics
from tenfold.settings import Settings, load_settings

log = structlog.get_logger(__name__)

PUBLIC_PATHS = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
)


def load_mounts(runtime: Runtime) -> list[Mount]:
    mounts = []
    for name in runtime.settings.services:
        module = importlib.import_module(f"tenfold.{name}")
        mounts.append(module.mount(runtime))
    return mounts


class App(FastAPI):
    """The FastAPI app, wrapped by the outer ASGI layers (edge, rate-limit guard)."""

    def __init__(self, runtime: Runtime, mounts: list[Mount], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runtime = runtime
        self.mounts = mounts
        self._outer: ASGIApp | None = None

    def wrap(self) -> ASGIApp:
        settings = self.runtime.settings
        inner: ASGIApp = super().__call__
        for mount in self.mounts:
            if mount.wrap is not None:
                inner = mount.wrap(inner)
        raw = tuple(p for m in self.mounts for p in m.raw_body_prefixes)
        return EdgeMiddleware(
            inner,
            max_body_bytes=settings.max_body_bytes,
            raw_body_prefixes=raw,
            lean_routes=[r for m in self.mounts for r in m.lean_routes],
            gates=[m.gate for m in self.mounts if m.gate is not None],
        )

    def openapi(self) -> dict[str, Any]:
        return document_problems(super().openapi())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._outer is None:
            self._outer = self.wrap()
        await self._outer(scope, receive, send)


def build_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> App:
    if settings is None:  # the uvicorn factory: a fresh worker process, configured by env
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
    runtime = runtime or Runtime.from_settings(settings, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.create_admin_key:
            plaintext = await ensure_admin_key(runtime)
            if plaintext:
                print(  # shown once, on the console only
                    f"tenfold: created an admin API key (also in {settings.data_dir}/admin.key):\n"
                    f"  {plaintext}",
                    flush=True,
                )
        for mount in mounts:
            for hook in mount.on_start:
                await hook()
        # Everything built so far lives as long as the process: keep it out of the cyclic
        # collector, whose full passes over it stalled requests for 50-250 ms under load.
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            for mount in reversed(mounts):
                for hook in mount.on_stop:
                    await hook()
            await runtime.close()

    mounts: list[Mount] = []
    app = App(
        runtime,
        mounts,
        title="tenfold",
        version=__version__,
        description="Ten backend building blocks in one package.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    mounts.extend(load_mounts(runtime))
    if settings.ratelimit_guard:
        from tenfold.ratelimit.middleware import guard_mount

        mounts.append(guard_mount(runtime, lambda: public_paths(app)))
    install_problem_handlers(app)

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Every configured backend answers",
        responses={503: {"description": "a backend does not answer"}},
    )
    async def readyz() -> Response:
        results = await runtime.check()
        if all(v == "ok" for v in results.values()):
            return JSONResponse({"status": "ok", "checks": results})
        failing = ", ".join(k for k, v in results.items() if v != "ok")
        raise Problem(503, "not-ready", f"backends not answering: {failing}", checks=results)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    for mount in mounts:
        for router in mount.routers:
            app.include_router(router)
    return app


def public_paths(app: App) -> set[str]:
    return set(PUBLIC_PATHS) | {p for m in app.mounts for p in m.public_paths}
