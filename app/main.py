"""The FastAPI application. It never imports torch, diffusers or transformers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from starlette.datastructures import Headers
from starlette.responses import Response

import latentd
from app.auth import AuthState, authenticate
from app.config import ApiSettings, get_settings
from app.errors import error_response, install_error_handlers
from app.limits import BodySizeLimit
from app.metrics import Metrics, MetricsMiddleware
from app.reaper import Reaper
from app.routes import generations, openai, system
from app.serving import GenerationService
from latentd import keys
from latentd.contract import ErrorCode
from latentd.logs import event
from latentd.store import check_eviction_policy, warn_if_keeps_nothing

log = logging.getLogger("latentd.api")
GC_YOUNG_THRESHOLD = 10_000  # Python's default is 700


# A refused preflight's first reason: the request header that carried it, and what to change.
_CORS_REFUSALS = {
    "origin": ("Origin", "this origin may not call the API: it is not in LATENTD_CORS_ORIGINS"),
    "method": ("Access-Control-Request-Method", "the API takes GET, HEAD and POST"),
    "private-network": ("Access-Control-Request-Private-Network", "private network access is not offered"),
}


class Cors(CORSMiddleware):
    """Starlette's, whose refused preflight answered in plain text: in the error envelope here."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        failure = bytes(response.body).decode().removeprefix("Disallowed CORS ").split(",")[0].strip()
        param, message = _CORS_REFUSALS.get(failure, ("Origin", "refused cross-origin request"))
        kept = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        return error_response(400, ErrorCode.INVALID_REQUEST, message, param=param, headers=kept)


class LatentdAPI(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, less the 422 FastAPI adds to each operation with parameters that
        lists no 422 of its own: its body is not the error envelope, and such a route answers no
        422 (cancel: a path that fails its check is 404)."""
        if self.openapi_schema is not None:
            return self.openapi_schema
        schema = super().openapi()  # kept as self.openapi_schema: changed here, once
        framework_422 = {"$ref": "#/components/schemas/HTTPValidationError"}
        for operations in schema["paths"].values():
            for operation in operations.values():
                content = operation["responses"].get("422", {}).get("content", {})
                if content.get("application/json", {}).get("schema") == framework_422:
                    del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema


@contextlib.contextmanager
def ending_held_reads_on_exit(service: GenerationService) -> Iterator[None]:
    """On SIGTERM or SIGINT, answer the held reads (`?wait=`, the OpenAI route) at once, then let
    uvicorn's own handler stop the server. uvicorn waits for every open request before it exits,
    and a held read can last minutes: longer than a container's stop grace. Signals reach the main
    thread only: an app served in-process (a TestClient) gets no hook."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: FrameType | None) -> None:
        prior = previous[signal.Signals(signum)]
        if prior is signal.SIG_IGN:
            return
        loop.call_soon_threadsafe(service.ended.close)
        if callable(prior):
            prior(signum, frame)
        else:  # not under uvicorn: the default action
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prior in previous.items():
            # Only ours: after a forced exit uvicorn has put back its own predecessors already.
            if signal.getsignal(sig) is handler:
                signal.signal(sig, signal.SIG_DFL if prior is None else prior)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = redis.ConnectionPool.from_url(
            settings.effective_redis_url,
            socket_connect_timeout=1.0,
            socket_timeout=5.0,
            health_check_interval=30,
            max_connections=64,
        )
        connection = redis.Redis(connection_pool=pool)
        # The event loop's client. It waits (up to 5 s) for a free connection rather than failing
        # when more requests than connections are in flight. Without the retry given here, the
        # first command on each pooled connection fails after a Redis restart (tests/test_recovery.py).
        # A lost connection is retried, a timeout not: a stalled Redis would hold each command for
        # four socket timeouts, and a write sent again may have been done once already.
        apool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.effective_redis_url,
            socket_connect_timeout=1.0,
            socket_timeout=5.0,
            health_check_interval=30,
            max_connections=64,
            timeout=5,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3, supported_errors=(redis.ConnectionError,)),
        )
        aconnection = redis.asyncio.Redis(connection_pool=apool)
        try:
            check_eviction_policy(connection)
            warn_if_keeps_nothing(connection, log)
        except (redis.ConnectionError, redis.TimeoutError):  # a silent one (a dropped path) times out
            event(log, "redis_unreachable_at_start", logging.WARNING)  # /readyz says 503 until it is back
        app.state.settings = settings
        app.state.service = service = GenerationService(connection, aconnection, settings)
        app.state.metrics = metrics
        app.state.auth = AuthState(settings.static_key_digests(), settings.require_keys)
        try:
            keyed = app.state.auth.always or bool(keys.read_required(connection))
        except (redis.ConnectionError, redis.TimeoutError):
            keyed = app.state.auth.always
        app.state.auth.required = keyed  # what was logged: a change from here on is logged too
        if keyed:
            event(log, "auth_required")
        else:
            event(
                log,
                "auth_open",
                logging.WARNING,
                note="no API keys configured: anyone who reaches this port can use it; "
                "create one with `latentd keys create NAME`",
                host=settings.host,
            )
        metrics.watch_redis(service)
        event(
            log, "api_started", redis=pool.connection_kwargs.get("host"), default_model=settings.default_model
        )
        listener = asyncio.create_task(service.ended.listen(), name="latentd-ended-jobs")
        reaper = Reaper(
            connection,
            settings.lease_seconds,
            settings.job_ttl,
            settings.default_model,
            any_worker_alive=lambda: bool(service.live_workers()),
        )
        reaper.start()
        # What is loaded by now lives as long as the process: kept out of the collector, a full
        # collection no longer walks it, which stalled every request in flight for ~50 ms. Young
        # collections every 10,000 allocations instead of 700: a request allocates hundreds.
        # Measured in docs/benchmarks.md ("Reading the service figures").
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        try:
            with ending_held_reads_on_exit(service):
                yield
        finally:
            await asyncio.to_thread(reaper.stop)
            listener.cancel()
            # Bounded, in case a cancel is lost in a way `_cancel_requested` does not see.
            await asyncio.wait({listener}, timeout=5)
            await aconnection.aclose()
            await apool.disconnect()
            pool.disconnect()

    app = LatentdAPI(
        title="latentd",
        version=latentd.__version__,
        summary="Self-hosted image generation: submit a prompt, poll the job, download the picture.",
        lifespan=lifespan,
        # A path with a slash too many is a 404 in the error envelope: Starlette's redirect to the
        # other form was built from the client's Host header and answered before authentication.
        redirect_slashes=False,
    )
    install_error_handlers(app, authenticate)
    app.add_middleware(generations.StatusReads)  # innermost: inside the metrics and the body limit
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    if settings.allowed_origins():
        # Outside the body limit, whose 413 a browser could not read otherwise; a preflight is
        # answered here, before authentication, which a browser's preflight never carries.
        app.add_middleware(
            Cors,
            allow_origins=settings.allowed_origins(),
            allow_methods=["GET", "HEAD", "POST"],
            # Any: OpenAI's SDKs send headers of their own (`x-stainless-*`), whose preflight was
            # refused. No credentials (cookies) are taken, so none of them can carry one.
            allow_headers=["*"],
            expose_headers=[
                "Location",
                "Retry-After",
                "ETag",
                "WWW-Authenticate",
                "x-should-retry",
                "x-generation-id",
            ],
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(generations.router)
    app.include_router(openai.router)
    app.include_router(system.router)
    return app
