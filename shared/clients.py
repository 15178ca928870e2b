"""HTTP clients of the services: timeouts, retries with exponential backoff and jitter under one deadline, chunking.

Retried: connection errors and timeouts, 429, 502, 503 and 504 (honouring `Retry-After` up to a cap), and a 500
once (a worker that died restarts). Never retried: other 4xx, which mean the request itself is wrong, and a 500 that
repeats. All retries of one call share one deadline. Every error surfaces as `ServiceError` with the server's message.

RewardClient spreads its chunks over reward service replicas (`ReplicaSet`): a list of URLs, or one URL whose host
name resolves to several addresses (`docker compose up --scale reward=N`), re-resolved periodically. A replica that
fails is marked down, skipped while down and re-admitted once its /readyz answers 200; the failed chunk goes to
another replica at once (a retry like any other: same deadline, same attempt count).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import httpx

from shared.replicas import Replica, ReplicaSet, resolve_addresses, split_urls
from shared.scores import one_finite_score_each

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})


class ServiceError(Exception):
    """A service call failed for good: a 4xx, retries exhausted, or an answer that breaks the contract."""

    def __init__(self, message: str, status: int | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.type = status, type


class CallInterrupted(ServiceError):
    """The caller asked to stop (its `interrupt` event was set) while the call was waiting to retry."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int | None = None  # None: as many as the deadline allows
    deadline_s: float | None = 120.0  # one budget for the whole call: every attempt and every wait
    backoff_base: float = 0.25  # seconds before the first retry
    backoff_max: float = 10.0
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1]
    retry_after_max: float = 30.0  # a server's Retry-After is honoured up to this

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full backoff for `attempt` (0-based), never shorter than the server's Retry-After (capped)."""
        backoff = min(self.backoff_max, self.backoff_base * 2**attempt)
        backoff *= 1 - self.jitter * random.random()
        return max(backoff, min(retry_after or 0.0, self.retry_after_max))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _error_from(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()["error"]
        return ServiceError(f"{response.status_code} {body['type']}: {body['message']}", response.status_code,
                            body["type"])
    except (ValueError, KeyError, TypeError):
        return ServiceError(f"{response.status_code}: {response.text[:300]}", response.status_code)


class _ClosesOnExit:
    """`with Client(...) as c:` closes the client's connections on the way out."""

    http: Any  # the HTTP client underneath, set by the subclass

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AsyncClosesOnExit:
    http: Any  # the HTTP client underneath, set by the subclass

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class _Call:
    """The retry state of one call: attempts, repeated 500s, and the deadline they all share."""

    def __init__(self, client: _Retrying):
        self.client, self.policy = client, client.retry
        self.started = time.monotonic()
        self.attempt = 0
        self.server_errors = 0

    def timeout(self) -> float:
        """This attempt's timeout: the client's, cut to what is left of the deadline."""
        if self.policy.deadline_s is None:
            return self.client.timeout
        left = self.policy.deadline_s - (time.monotonic() - self.started)
        return max(0.001, min(self.client.timeout, left))

    def next_delay(self, outcome: httpx.Response | Exception, failover: str | None = None) -> float:
        """Seconds to wait before trying again, or raise ServiceError when `outcome` is final. `failover`: the
        replica that failed, when another one can take the retry at once (no wait: the backoff and a Retry-After
        are about the replica that failed)."""
        status = getattr(outcome, "status_code", None)
        if isinstance(outcome, httpx.Response):
            error = _error_from(outcome)
            self.server_errors += status == 500
            if status not in RETRY_STATUSES and not (status == 500 and self.server_errors == 1):
                raise error  # the request is wrong, or the server fails it every time: fail fast
            retry_after, why = _retry_after(outcome), str(error)
        else:
            retry_after, why = None, f"{type(outcome).__name__}: {outcome}"
        delay = 0.0 if failover else self.policy.delay(self.attempt, retry_after)
        elapsed = time.monotonic() - self.started
        out_of_tries = self.policy.max_retries is not None and self.attempt >= self.policy.max_retries
        out_of_time = self.policy.deadline_s is not None and elapsed + delay >= self.policy.deadline_s
        c = self.client
        if out_of_tries or out_of_time:
            raise ServiceError(f"{c.name} at {c.url} failed after {self.attempt + 1} attempts in {elapsed:.1f} s "
                               f"({why})", status, getattr(error, "type", None) if status else None)
        self.attempt += 1
        if failover:
            log.warning("%s at %s: %s; retrying on another replica (retry %d)", c.name, failover, why, self.attempt)
        else:
            log.warning("%s at %s: %s; retrying in %.2f s (retry %d)", c.name, c.url, why, delay, self.attempt)
        return delay


class _Retrying:
    """What the sync and async clients share: base URL, auth, timeout and retry policy."""

    def __init__(self, url: str, api_key: str | None, timeout: float, retry: RetryPolicy, name: str):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retry = retry
        self.name = name


class HttpJsonClient(_Retrying, _ClosesOnExit):
    """Blocking JSON-over-HTTP with retries. Setting `interrupt` ends a call that is waiting to retry
    (CallInterrupted), so a process asked to stop is not held by a service that is down."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), name: str = "service",
                 transport: httpx.BaseTransport | None = None, interrupt: threading.Event | None = None):
        super().__init__(url, api_key, timeout, retry, name)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout, transport=transport)
        self.interrupt = interrupt or threading.Event()

    def request(self, method: str, path: str, json: Any = None) -> Any:
        call = _Call(self)
        while True:
            try:
                response = self._http.request(method, path, json=json, timeout=call.timeout())
                if response.is_success:
                    return response.json() if response.content else None
                outcome: httpx.Response | Exception = response
            except httpx.TransportError as exc:
                outcome = exc
            if self.interrupt.wait(call.next_delay(outcome)):
                raise CallInterrupted(f"{self.name} at {self.url}: call interrupted while waiting to retry "
                                      f"({outcome if isinstance(outcome, Exception) else _error_from(outcome)})")

    def close(self) -> None:
        self._http.close()


class AsyncHttpJsonClient(_Retrying, _AsyncClosesOnExit):
    """Non-blocking JSON-over-HTTP with retries."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), name: str = "service",
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(url, api_key, timeout, retry, name)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout, transport=transport)

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        call = _Call(self)
        while True:
            try:
                response = await self._http.request(method, path, json=json, timeout=call.timeout())
                if response.is_success:
                    return response.json() if response.content else None
                outcome: httpx.Response | Exception = response
            except httpx.TransportError as exc:
                outcome = exc
            await asyncio.sleep(call.next_delay(outcome))

    async def aclose(self) -> None:
        await self._http.aclose()


# -- replicas ---------------------------------------------------------------------------------------------------------

class ReplicatedHttpJsonClient(_Retrying, _ClosesOnExit):
    """Blocking JSON-over-HTTP with retries, over the replicas of a `ReplicaSet`: each attempt goes to the replica
    `pick()` gives; a replica that fails is marked down and the retry goes to another one at once, or, when none is
    up, after the backoff (with one replica: exactly HttpJsonClient). With several replicas a connection must be
    made within `connect_timeout` seconds: the address of a container that is gone answers nothing, and would
    otherwise hold its chunk for the whole `timeout`. Thread-safe: chunks of one call may run in several threads.
    `interrupt` ends a call that is waiting to retry (CallInterrupted), as in HttpJsonClient."""

    def __init__(self, url: str | Sequence[str], *, api_key: str | None = None, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), name: str = "service",
                 transport: httpx.BaseTransport | None = None, interrupt: threading.Event | None = None,
                 resolve: Callable[[str, int], list[str]] | None = None, resolve_every_s: float = 10.0,
                 down_s: float = 1.0, down_max_s: float = 30.0, connect_timeout: float = 5.0):
        urls = split_urls(url)
        super().__init__(", ".join(urls), api_key, timeout, retry, name)
        self.connect_timeout = connect_timeout
        self._http = httpx.Client(headers=self.headers, timeout=timeout, transport=transport)
        self.interrupt = interrupt or threading.Event()
        self.replicas = ReplicaSet(urls, resolve=resolve or resolve_addresses, resolve_every_s=resolve_every_s,
                                   down_s=down_s, down_max_s=down_max_s, probe=self._ready, name=name)

    def _ready(self, r: Replica) -> bool:
        response = self._http.get(r.url + "/readyz", headers=r.headers, extensions=r.extensions,
                                  timeout=min(5.0, self.timeout))
        return response.status_code == 200

    def request(self, method: str, path: str, json: Any = None, cancel: threading.Event | None = None) -> Any:
        """One request, retried as the policy says. A set `cancel` (the rest of a call failed) ends it at its next
        wait, as `interrupt` does."""
        call = _Call(self)
        while True:
            r = self.replicas.pick()
            left = call.timeout()
            timeout: float | httpx.Timeout = left
            if len(self.replicas) > 1:  # a replica that is gone (its address unanswered) must not hold a chunk long
                timeout = httpx.Timeout(left, connect=min(left, self.connect_timeout))
            try:
                response = self._http.request(method, r.url + path, json=json, headers=r.headers,
                                              extensions=r.extensions, timeout=timeout)
            except httpx.TransportError as exc:
                self.replicas.fail(r, f"{type(exc).__name__}: {exc}")
                outcome: httpx.Response | Exception = exc
            else:
                status = response.status_code
                if status >= 500 or status in RETRY_STATUSES:
                    self.replicas.fail(r, f"HTTP {status}", _retry_after(response))
                else:
                    self.replicas.done(r)
                if response.is_success:
                    return response.json() if response.content else None
                outcome = response
            delay = call.next_delay(outcome, failover=r.name if self.replicas.others_up(r) else None)
            if delay > 0 and self._wait(delay, cancel):
                why = outcome if isinstance(outcome, Exception) else _error_from(outcome)
                raise CallInterrupted(f"{self.name} at {r.name}: call interrupted while waiting to retry ({why})")

    def _wait(self, delay: float, cancel: threading.Event | None) -> bool:
        """Sleep `delay` s; True as soon as `interrupt` (or `cancel`) is set."""
        if cancel is None:
            return self.interrupt.wait(delay)
        end = time.monotonic() + delay
        while not (self.interrupt.is_set() or cancel.is_set()):
            left = end - time.monotonic()
            if left <= 0:
                return False
            cancel.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        self._http.close()


def _chunks(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[i : i + size]) for i in range(0, len(texts), size)]


def _checked_scores(body: Any, expected: int) -> list[float]:
    """The answer's `scores`, held to the scores contract (one finite number per text)."""
    scores = body.get("scores") if isinstance(body, dict) else None
    return one_finite_score_each(scores if isinstance(scores, list) else None, expected, "reward service",
                                 ServiceError)


def _payload(texts: list[str], model: str | None, label: str | None = None) -> dict:
    return {"texts": texts, **({"model": model} if model else {}), **({"label": label} if label else {})}


class RewardClient(_ClosesOnExit):
    """Blocking client of the reward service. Long lists are split into requests of at most `chunk_size` texts.

    `url`: one base URL, several (a list, or comma-separated), or a host name with several addresses (the replicas
    of `docker compose up --scale reward=N`, as `http://reward:8000`). With several replicas, a call is split into
    at least one chunk per replica that is up, and its chunks go out concurrently (at most `max_concurrency` at
    once; default: two per replica), each to the replica with the least in flight; a replica that fails is skipped
    until its /readyz answers again, and its chunks are retried on the others. Scores come back in order; every
    chunk keeps the retry policy (one deadline for all its attempts). With one replica the chunks go one after the
    other, as they always did. Thread-safe.
    """

    def __init__(self, url: str | Sequence[str] = "http://127.0.0.1:8000", *, model: str | None = None,
                 label: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), chunk_size: int = 256,
                 transport: httpx.BaseTransport | None = None, interrupt: threading.Event | None = None,
                 max_concurrency: int | None = None, resolve: Callable[[str, int], list[str]] | None = None,
                 resolve_every_s: float = 10.0, down_s: float = 1.0, down_max_s: float = 30.0,
                 connect_timeout: float = 5.0):
        if chunk_size < 1 or (max_concurrency is not None and max_concurrency < 1):
            raise ValueError("chunk_size and max_concurrency must be >= 1")
        self.model, self.label, self.chunk_size = model, label, chunk_size
        self.max_concurrency = max_concurrency
        self.http = ReplicatedHttpJsonClient(url, api_key=api_key, timeout=timeout, retry=retry,
                                             name="reward service", transport=transport, interrupt=interrupt,
                                             resolve=resolve, resolve_every_s=resolve_every_s, down_s=down_s,
                                             down_max_s=down_max_s, connect_timeout=connect_timeout)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def replicas(self) -> list[Replica]:
        return self.http.replicas.replicas

    def _split(self, texts: Sequence[str]) -> list[list[str]]:
        """Chunks of at most `chunk_size`, and at least one per replica that is up (so each one gets a share)."""
        size = self.chunk_size
        if len(self.http.replicas) > 1:
            size = min(size, max(1, math.ceil(len(texts) / max(1, self.http.replicas.up_count()))))
        return _chunks(texts, size)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="reward-client")
            return self._pool

    def _post_all(self, path: str, chunks: list[list[str]], payload: Callable[[list[str]], dict],
                  check: Callable[[Any, list[str]], list]) -> list:
        """`check(answer, chunk)` of one POST per chunk, in order: concurrent when there are several replicas."""
        limit = self.max_concurrency or (1 if len(self.http.replicas) == 1 else 2 * len(self.http.replicas))
        if min(limit, len(chunks)) <= 1:
            return [check(self.http.request("POST", path, payload(c)), c) for c in chunks]
        cancel = threading.Event()  # one chunk failed for good: the others stop at their next wait
        pool, pending = self._executor(), {}
        results: list[list] = [[]] * len(chunks)
        queue = iter(enumerate(chunks))

        def one(chunk: list[str]) -> list:
            return check(self.http.request("POST", path, payload(chunk), cancel), chunk)

        def send_next() -> None:
            for i, chunk in queue:
                pending[pool.submit(one, chunk)] = i
                return

        for _ in range(min(limit, len(chunks))):
            send_next()
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    results[pending.pop(future)] = future.result()
                    send_next()
        except BaseException:
            cancel.set()
            raise
        return results

    def score(self, texts: Sequence[str], model: str | None = None) -> list[float]:
        parts = self._post_all("/v1/score", self._split(texts), lambda c: _payload(c, model or self.model, self.label),
                               lambda body, c: _checked_scores(body, len(c)))
        return [s for part in parts for s in part]

    def classify(self, texts: Sequence[str], model: str | None = None) -> list[dict[str, float]]:
        parts = self._post_all("/v1/classify", self._split(texts), lambda c: _payload(c, model or self.model),
                               lambda body, c: body["probabilities"])
        return [p for part in parts for p in part]

    def models(self) -> list[dict]:
        return self.http.request("GET", "/v1/models")["models"]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


class AsyncRewardClient(_AsyncClosesOnExit):
    """Non-blocking client of the reward service; chunks go out concurrently, at most `max_concurrency` at once."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, model: str | None = None, label: str | None = None,
                 api_key: str | None = None, timeout: float = 60.0, retry: RetryPolicy = RetryPolicy(),
                 chunk_size: int = 256, max_concurrency: int = 4, transport: httpx.AsyncBaseTransport | None = None):
        if chunk_size < 1 or max_concurrency < 1:
            raise ValueError("chunk_size and max_concurrency must be >= 1")
        self.model, self.label, self.chunk_size = model, label, chunk_size
        self._limit = asyncio.Semaphore(max_concurrency)
        self.http = AsyncHttpJsonClient(url, api_key=api_key, timeout=timeout, retry=retry, name="reward service",
                                        transport=transport)

    async def _post(self, path: str, chunk: list[str], model: str | None) -> Any:
        async with self._limit:
            label = self.label if path == "/v1/score" else None
            return await self.http.request("POST", path, _payload(chunk, model or self.model, label))

    async def score(self, texts: Sequence[str], model: str | None = None) -> list[float]:
        chunks = _chunks(texts, self.chunk_size)
        bodies = await asyncio.gather(*(self._post("/v1/score", c, model) for c in chunks))
        return [s for body, c in zip(bodies, chunks) for s in _checked_scores(body, len(c))]

    async def classify(self, texts: Sequence[str], model: str | None = None) -> list[dict[str, float]]:
        chunks = _chunks(texts, self.chunk_size)
        bodies = await asyncio.gather(*(self._post("/v1/classify", c, model) for c in chunks))
        return [p for body in bodies for p in body["probabilities"]]

    async def models(self) -> list[dict]:
        return (await self.http.request("GET", "/v1/models"))["models"]


def _generate_payload(prompts: Sequence[str], checkpoint: str, params: dict[str, Any]) -> dict:
    return {"prompts": list(prompts), "checkpoint": checkpoint, **{k: v for k, v in params.items() if v is not None}}


class GeneratorClient(_ClosesOnExit):
    """Blocking client of the generator service. Extra keyword arguments are sampling parameters."""

    def __init__(self, url: str = "http://127.0.0.1:8001", *, api_key: str | None = None, timeout: float = 300.0,
                 retry: RetryPolicy = RetryPolicy(), transport: httpx.BaseTransport | None = None):
        self.http = HttpJsonClient(url, api_key=api_key, timeout=timeout, retry=retry, name="generator service",
                                   transport=transport)

    def generate(self, prompts: Sequence[str], checkpoint: str = "latest", **params: Any) -> dict:
        """The whole response: `checkpoint`, `step` and `completions` (prompt, completion, text, ...)."""
        return self.http.request("POST", "/v1/generate", _generate_payload(prompts, checkpoint, params))

    def checkpoints(self) -> list[dict]:
        return self.http.request("GET", "/v1/checkpoints")["checkpoints"]


class AsyncGeneratorClient(_AsyncClosesOnExit):
    """Non-blocking client of the generator service."""

    def __init__(self, url: str = "http://127.0.0.1:8001", *, api_key: str | None = None, timeout: float = 300.0,
                 retry: RetryPolicy = RetryPolicy(), transport: httpx.AsyncBaseTransport | None = None):
        self.http = AsyncHttpJsonClient(url, api_key=api_key, timeout=timeout, retry=retry,
                                        name="generator service", transport=transport)

    async def generate(self, prompts: Sequence[str], checkpoint: str = "latest", **params: Any) -> dict:
        return await self.http.request("POST", "/v1/generate", _generate_payload(prompts, checkpoint, params))

    async def checkpoints(self) -> list[dict]:
        return (await self.http.request("GET", "/v1/checkpoints"))["checkpoints"]


class RemoteRewardFn:
    """A trlX-style reward function backed by the reward service: `reward_fn(samples, prompts, outputs, **kw)`.

    It scores `samples` (prompt + completion), as trlX's sentiment example does.
    """

    def __init__(self, client: RewardClient):
        self.client = client

    def __call__(self, samples: Sequence[str], prompts: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None, **kwargs: Any) -> list[float]:
        return self.client.score(list(samples))


def make_reward_fn(url: str | Sequence[str] = "http://127.0.0.1:8000", **client_kwargs: Any) -> RemoteRewardFn:
    return RemoteRewardFn(RewardClient(url, **client_kwargs))
