"""What every service's HTTP side shares: the error envelope, body limits, API keys, health and Prometheus metrics.

Status codes are chosen here and in routes only; the engines below them raise plain exceptions.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiError(Exception):
    """An error with its HTTP status and envelope type; raised by routes, rendered by the handlers below."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers


def error_response(status: int, type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "message": message}}, status_code=status, headers=headers)


_STATUS_TYPES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
                 429: "overloaded", 503: "unavailable"}


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the body is not valid JSON"
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, ours or the framework's, as `{"error": {"type", "message"}}`."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return error_response(status, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, _STATUS_TYPES.get(exc.status_code, "error"), str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")


class BodyGuard:
    """ASGI middleware: JSON bodies only (415) and at most `max_bytes` of them (413), checked before the body is
    read in full, so a huge upload costs no memory and never reaches a route."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send, 413, "payload_too_large",
                                      f"body of {int(length)} bytes exceeds the limit of {self.max_bytes}")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if length != "0" and ctype and not (ctype == "application/json" or ctype.endswith("+json")):
            return await self._reject(scope, receive, send, 415, "unsupported_media_type",
                                      f"content type {ctype!r} is not supported; send application/json")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._reject(scope, None, send, 413, "payload_too_large",
                               f"body exceeds the limit of {self.max_bytes} bytes")

    @staticmethod
    async def _reject(scope, receive, send, status, type, message):
        await error_response(status, type, message)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def bearer_guard(get_key: Callable[[], str | None]) -> Callable[[Request], None]:
    """A FastAPI dependency that demands `Authorization: Bearer <key>` when a key is configured."""

    def guard(request: Request) -> None:
        key = get_key()
        if not key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           {"WWW-Authenticate": "Bearer"})

    return guard


class HttpMetrics:
    """Requests by route and status and their latency, in the app's own Prometheus registry."""

    def __init__(self, namespace: str, registry: CollectorRegistry):
        self.requests = Counter(f"{namespace}_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram(f"{namespace}_request_latency_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=registry)


class RequestObserver:
    """ASGI middleware: counts requests, observes latency and sets `x-total-time` (ms) on every response."""

    def __init__(self, app, metrics: HttpMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.perf_counter() - started) * 1000
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-total-time", f"{elapsed_ms:.2f}".encode())]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def add_operational_routes(app: FastAPI, registry: CollectorRegistry, is_ready: Callable[[], str | None]) -> None:
    """`/healthz` (alive), `/readyz` (503 until `is_ready()` returns None, else its reason), `/metrics`."""

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz():
        reason = is_ready()
        if reason is not None:
            return error_response(503, "unavailable", reason, {"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        for hook in getattr(app.state, "before_scrape", ()):
            hook()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def create_service_app(*, title: str, namespace: str, max_body_bytes: int, lifespan, version: str = "1") -> FastAPI:
    """A FastAPI app with the shared error envelope, body guard, request metrics and operational routes."""
    app = FastAPI(title=title, version=version, lifespan=lifespan,
                  responses={"default": {"model": None, "description": "Error: {\"error\": {\"type\", \"message\"}}"}})
    app.state.registry = CollectorRegistry()
    app.state.http_metrics = HttpMetrics(namespace, app.state.registry)
    app.state.before_scrape = []
    install_error_handlers(app)
    app.add_middleware(BodyGuard, max_bytes=max_body_bytes)
    app.add_middleware(RequestObserver, metrics=app.state.http_metrics)
    return app


class BackgroundLoad:
    """Loads a service's models after start-up, so /healthz answers at once and /readyz says 503 (with the reason)
    until they are in memory, or why they failed to load. A failure leaves the process up for the admin API."""

    def __init__(self, what: str, load: Callable[[], Awaitable[None]]):
        self.what, self._load = what, load
        self.not_ready: str | None = f"{what} loading"
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        try:
            await self._load()
            self.not_ready = None
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log
            self.not_ready = f"{self.what} failed to load: {exc}"
            log.error("%s", self.not_ready)

    def lifespan(self, torch_threads: int, on_shutdown: Callable[[], Awaitable[None]]):
        """A FastAPI lifespan: pin torch threads, load in the background, run `on_shutdown` at the end."""
        from shared.runtime import configure_torch

        @asynccontextmanager
        async def lifespan(_: FastAPI):
            configure_torch(torch_threads)
            self._task = asyncio.create_task(self._run())
            yield
            self._task.cancel()
            await on_shutdown()

        return lifespan
