"""What every service's HTTP side shares: the error envelope, body limits, API keys, health and Prometheus metrics.

Status codes are chosen here and in routes only; the engines below them raise plain exceptions.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import RETRY_SOON, STATUS_OF, ApiError, as_api_error
from shared.readiness import LOAD_FAILED

log = logging.getLogger(__name__)

# The id of the request being served: set by RequestObserver, echoed as `x-request-id`, named in fault logs.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def error_response(status: int, type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    error = {"type": type, "message": message}
    if (rid := request_id.get()) is not None:
        error["request_id"] = rid
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def server_fault(type: str, message: str) -> ApiError:
    """A 500 for a real server fault (never the client's input), logged with the request id."""
    log.error("request %s: %s: %s", request_id.get(), type, message)
    return ApiError(500, type, message)


@contextmanager
def batcher_errors() -> Iterator[None]:
    """Map what a batched computation raises to HTTP: what shared.errors.STATUS_OF lists by that table (full queue
    429, timeout / closed / dead worker 503), anything else 500."""
    try:
        yield
    except ApiError:
        raise
    except Exception as exc:
        if (known := as_api_error(exc)) is not None:
            raise known from None
        # the model itself failed: a server fault, never the client's input
        log.exception("request %s: inference failed", request_id.get())
        raise ApiError(500, "inference_error", f"inference failed: {type(exc).__name__}: {exc}") from None


_STATUS_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed",
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
    """Render every error, ours or the framework's, as `{"error": {"type", "message", "request_id"}}`; unexpected
    exceptions become a 500 in RequestObserver."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    async def _listed(request: Request, exc: Exception) -> JSONResponse:  # raised outside batcher_errors
        answer = as_api_error(exc)
        if answer is None:  # registered for the table's classes only, so unreachable; never a silent 200
            raise exc
        return await _api_error(request, answer)

    for listed in STATUS_OF:
        app.add_exception_handler(listed, _listed)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return error_response(status, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, _STATUS_TYPES.get(exc.status_code, "error"), str(exc.detail),
                              getattr(exc, "headers", None))


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
        if length is None:  # chunked: read it here (bounded), so an oversized one is a 413, not a parse error
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body += message.get("body", b"")
                if len(body) > self.max_bytes:
                    return await self._reject(scope, None, send, 413, "payload_too_large",
                                              f"body exceeds the limit of {self.max_bytes} bytes")
                if not message.get("more_body"):
                    break
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    @staticmethod
    async def _reject(scope, receive, send, status, type, message):
        await error_response(status, type, message)(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI `receive` that hands over `body` once, then defers to the real one (for disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


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
    """ASGI middleware: gives every request an id (the client's `x-request-id` when sane, else a new one), counts
    requests, observes latency and sets `x-request-id` and `x-total-time` (ms) on every response."""

    def __init__(self, app, metrics: HttpMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        response_started = False

        async def observed_send(message):
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                elapsed_ms = (time.perf_counter() - started) * 1000
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode()),
                                      (b"x-total-time", f"{elapsed_ms:.2f}".encode())]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:  # noqa: BLE001 - a fault: logged with the id the client also gets
            log.exception("request %s: unhandled error", rid)
            if not response_started:
                await error_response(500, "internal_error", "internal error; see the server log for request "
                                     f"{rid}")(scope, receive, observed_send)
        finally:
            request_id.reset(token)
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
            return error_response(503, "unavailable", reason, RETRY_SOON)
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
    until they are in memory, or why they failed to load. A failure with `exit_on_failure` also ends the server
    that `serve` (or a test's server thread) runs the app in; without it the process stays up for the admin API."""

    def __init__(self, what: str, load: Callable[[], Awaitable[None]], *, exit_on_failure: bool = False):
        self.what, self._load = what, load
        self.exit_on_failure = exit_on_failure
        self.not_ready: str | None = f"{what} loading"
        self.done = False  # the load has ended, well or not
        self.failure: str | None = None  # why the load failed
        self.stop_server: Callable[[], None] | None = None  # set by whoever runs the server
        self._task: asyncio.Task | None = None

    @property
    def loading(self) -> str | None:
        """Why requests must wait (the load is still running), else None."""
        return None if self.done else self.not_ready

    @property
    def stops_server(self) -> bool:
        """The load failed and the server is (being) stopped for it."""
        return self.failure is not None and self.exit_on_failure and self.stop_server is not None

    async def _run(self) -> None:
        try:
            await self._load()
            self.not_ready = None
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log
            why = " ".join(str(exc).split()) or type(exc).__name__  # one line, for /readyz and a CLI's error line
            self.failure = self.not_ready = f"{self.what} {LOAD_FAILED}: {why}"
            log.error("%s", self.failure)
            stop = self.stop_server
            if self.stops_server and stop is not None:
                log.error("stopping: the service cannot serve without it (exit_on_load_failure)")
                stop()
        finally:
            self.done = True

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


def stop_on_load_failure(app: FastAPI, server: uvicorn.Server) -> None:
    """Let the app's BackgroundLoad (`app.state.loading`) end `server` when it fails and exit_on_failure is set."""
    loading = getattr(app.state, "loading", None)
    if isinstance(loading, BackgroundLoad):
        loading.stop_server = lambda: setattr(server, "should_exit", True)


def serve(app: FastAPI, host: str, port: int, log_level: str) -> None:
    """Run `app` under uvicorn until it is stopped. When its startup load failed and ended the server, say why on
    stderr (`error: ...`) and exit with code 1, so a supervisor sees the failure instead of a service stuck unready."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=10))
    stop_on_load_failure(app, server)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    loading = getattr(app.state, "loading", None)
    if isinstance(loading, BackgroundLoad) and loading.stops_server:
        print(f"error: {loading.failure}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    if not server.started:
        raise SystemExit(3)  # uvicorn's code for a failed start-up (it has logged why)
