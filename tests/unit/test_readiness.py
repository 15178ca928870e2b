"""shared/readiness.py against real servers on loopback: ready, not yet, failed to load, dead, stopped."""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI, Request

from shared.clients import CallInterrupted
from shared.readiness import LoadFailed, NotReady, wait_until_ready
from shared.server import error_response
from tests.conftest import free_port


def readiness_app(answers: list[tuple[int, str]]) -> FastAPI:
    """/readyz gives the `answers` in turn (status, message), then the last one forever; it records what it saw."""
    app = FastAPI()
    app.state.calls, app.state.headers = 0, []

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        status, message = answers[min(app.state.calls, len(answers) - 1)]
        app.state.calls += 1
        app.state.headers.append(request.headers.get("authorization"))
        return {"status": "ready"} if status == 200 else error_response(status, "unavailable", message)

    return app


def test_waits_through_503s_until_ready_and_reports_each_new_reason(serve):
    app = readiness_app([(503, "model loading"), (503, "model loading"), (503, "warming up"), (200, "")])
    s = serve(app, ready_path="/healthz")
    reasons: list[str] = []
    wait_until_ready(s.url, 60, on_wait=reasons.append, headers={"Authorization": "Bearer k"})
    assert app.state.calls == 4
    assert reasons == ["HTTP 503: model loading", "HTTP 503: warming up"]  # said once each, when it changed
    assert set(app.state.headers) == {"Bearer k"}


def test_a_load_failure_ends_the_wait_at_once_with_the_services_own_message(serve):
    app = readiness_app([(503, "reward model loading"), (503, "reward model failed to load: folder '/x' missing")])
    s = serve(app, ready_path="/healthz")
    with pytest.raises(LoadFailed, match=r"^reward model failed to load: folder '/x' missing$"):
        wait_until_ready(s.url, 600)
    assert app.state.calls == 2  # no further polling


def test_not_ready_in_time_names_the_url_and_the_last_reason(serve):
    s = serve(readiness_app([(503, "still loading")]), ready_path="/healthz")
    with pytest.raises(NotReady, match=r"not ready after 1 s: HTTP 503: still loading") as caught:
        wait_until_ready(s.url, 1)
    assert s.url in str(caught.value) and not isinstance(caught.value, LoadFailed)


def test_nothing_listening_is_a_reason_to_wait_not_an_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(NotReady, match="ConnectError"):
        wait_until_ready(url, 0.5)


def test_alive_is_asked_before_each_poll_and_its_error_ends_the_wait():
    checks = []

    def alive() -> None:
        checks.append(1)
        if len(checks) == 3:
            raise RuntimeError("the service exited with 1")

    with pytest.raises(RuntimeError, match="exited with 1"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", 600, alive=alive)
    assert len(checks) == 3


def test_a_set_stop_event_interrupts_the_wait():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(CallInterrupted, match="stopped while waiting"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", 600, stop=stop)


def test_several_replicas_one_ready_is_enough_and_all_failed_is_a_load_failure(serve):
    dead = f"http://127.0.0.1:{free_port()}"
    ready = serve(readiness_app([(200, "")]), ready_path="/healthz")
    wait_until_ready(f"{dead},{ready.url}", 30)
    failed = [serve(readiness_app([(503, "reward model failed to load: boom")]), ready_path="/healthz")
              for _ in range(2)]
    with pytest.raises(LoadFailed, match="boom"):
        wait_until_ready([f.url for f in failed], 600)
    with pytest.raises(NotReady, match="boom") as caught:  # one failed, one may still come up: keep waiting
        wait_until_ready([failed[0].url, dead], 1)
    assert not isinstance(caught.value, LoadFailed)


def test_a_4xx_or_500_answer_is_waited_on_with_its_message(serve):
    s = serve(readiness_app([(500, "internal error")]), ready_path="/healthz")
    with pytest.raises(NotReady, match="HTTP 500: internal error"):
        wait_until_ready(s.url, 0.5)
