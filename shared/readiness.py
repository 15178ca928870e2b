"""Waiting for a service to become ready: poll its /readyz with backoff until it answers 200.

A service whose model failed to load says so on /readyz (503, "<what> failed to load: <why>"): waiting on stops at
once with LoadFailed, since that service will not become ready by itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import httpx

from shared.clients import CallInterrupted, RetryPolicy
from shared.replicas import split_urls

LOAD_FAILED = "failed to load"  # BackgroundLoad's words on /readyz when a startup load failed
BACKOFF = RetryPolicy(backoff_base=0.2, backoff_max=5.0, jitter=0.5)
PROBE_TIMEOUT_S = 5.0


class NotReady(RuntimeError):
    """The service did not become ready in time; str() has the last reason."""


class LoadFailed(NotReady):
    """The service reports that its model failed to load (its own message)."""


def _message(response: httpx.Response) -> str:
    """The error envelope's message, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def probe(http: httpx.Client, url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when `url` answers 200, else why not; LoadFailed when the service says its model failed to load."""
    try:
        response = http.get(url, timeout=timeout)
    except httpx.TransportError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if response.status_code == 200:
        return None
    message = _message(response)
    if response.status_code == 503 and LOAD_FAILED in message:
        raise LoadFailed(message)
    return f"HTTP {response.status_code}: {message}" if message else f"HTTP {response.status_code}"


def _probe_any(http: httpx.Client, urls: list[str], timeout: float) -> str | None:
    """None when one of `urls` is ready, else the reasons; LoadFailed only when every one of them failed to load."""
    reasons, failures = [], []
    for url in urls:
        try:
            reason = probe(http, url, timeout)
        except LoadFailed as exc:
            failures.append(exc)
            reason = str(exc)
        if reason is None:
            return None
        reasons.append(reason if len(urls) == 1 else f"{url}: {reason}")
    if len(failures) == len(urls):
        raise LoadFailed("; ".join(reasons))
    return "; ".join(reasons)


def wait_until_ready(url: str | Sequence[str], timeout: float, *, path: str = "/readyz",
                     headers: dict | None = None, alive: Callable[[], None] | None = None,
                     on_wait: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                     max_delay: float | None = None) -> None:
    """Poll `url + path` with exponential backoff (0.2 s doubling to 5 s, or `max_delay`, with jitter) until it
    answers 200. A launcher that watches its own children passes a short `max_delay`: it should see them ready, or
    dead, within a second.

    `url`: one base URL, or several (replicas, a list or comma-separated): until one of them is ready. `alive()`
    runs before each poll and raises when the process waited on has died. `on_wait(reason)` hears the reason
    whenever it changes. A set `stop` ends the wait with CallInterrupted. Raises LoadFailed as soon as the service
    says its model failed to load, NotReady (with the last reason) after `timeout` seconds.
    """
    urls = [u.rstrip("/") + path for u in split_urls(url)]
    where = ", ".join(split_urls(url))
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout
    reason, attempt = "no answer yet", 0
    with httpx.Client(headers=headers) as http:
        while True:
            if alive is not None:
                alive()
            left = deadline - time.monotonic()
            new_reason = _probe_any(http, urls, max(0.1, min(PROBE_TIMEOUT_S, left)))
            if new_reason is None:
                return
            if new_reason != reason and on_wait is not None:
                on_wait(new_reason)
            reason = new_reason
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotReady(f"{where} not ready after {timeout:.0f} s: {reason}")
            if stop.wait(min(BACKOFF.delay(attempt), max_delay or left, left)):
                raise CallInterrupted(f"stopped while waiting for {where} to be ready ({reason})")
            attempt += 1
