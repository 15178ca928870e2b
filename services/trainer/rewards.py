"""Turning a reward function's answer into trustworthy scores, and waiting for the reward service."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import httpx

from services.trainer.config import RewardConfig
from shared.clients import CallInterrupted, RemoteRewardFn, RetryPolicy, RewardClient
from shared.replicas import split_urls

log = logging.getLogger(__name__)
RewardFn = Callable[..., Sequence[float]]


class RewardError(RuntimeError):
    """The reward function broke its contract; the update is skipped and the run stops with this message."""


def checked_scores(raw, expected: int) -> list[float]:
    """Exactly one finite number per sample, or RewardError. A bad score must never reach an update."""
    try:
        scores = [float(s) for s in raw]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward function returned something other than numbers: {exc}") from None
    if len(scores) != expected:
        raise RewardError(f"reward function returned {len(scores)} scores for {expected} samples")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise RewardError(f"reward function returned non-finite scores at {bad[:10]}")
    return scores


def wait_for_reward_service(url: str | Sequence[str], deadline_s: float, on_wait: Callable[[str], None] | None = None,
                            api_key: str | None = None, stop: threading.Event | None = None) -> None:
    """Poll `/readyz` with exponential backoff (and jitter) until it answers 200, saying so while waiting; a set
    `stop` ends the wait with CallInterrupted. Several URLs (a list or comma-separated, the replicas): until one of
    them is ready; the reward function skips the others until they are."""
    urls = split_urls(url)
    where = ", ".join(urls)
    policy = RetryPolicy(backoff_base=0.5, backoff_max=10.0)
    stop = stop or threading.Event()
    started = time.monotonic()
    attempt = 0
    while True:
        whys = []
        for u in urls:
            try:
                r = httpx.get(u + "/readyz", timeout=5)
                if r.status_code == 200:
                    return
                whys.append(f"HTTP {r.status_code}")
            except httpx.TransportError as exc:
                whys.append(type(exc).__name__)
        why = ", ".join(whys)
        delay = policy.delay(attempt)
        if time.monotonic() - started + delay > deadline_s:
            raise RewardError(f"reward service at {where} not ready after {deadline_s:.0f} s ({why})")
        message = f"waiting for the reward service at {where} ({why}); next try in {delay:.1f} s"
        log.warning(message)
        if on_wait:
            on_wait(message)
        if stop.wait(delay):
            raise CallInterrupted(f"stopped while waiting for the reward service at {where}")
        attempt += 1


def remote_reward_fn(cfg: RewardConfig, stop: threading.Event | None = None) -> RemoteRewardFn:
    """The reward function that calls the reward service: retries with backoff ride out a restart, within one time
    budget per call (`retry_deadline_s`), after which the run fails rather than hang; a set `stop` ends a call that
    is waiting to retry (CallInterrupted), so a stop is never held up by a reward service that is down. Several
    replicas (`reward.url` a list, or a name with several addresses): chunks are spread over them and a replica
    that fails is skipped, its chunks retried on the others (shared/clients.py RewardClient)."""
    retry = RetryPolicy(max_retries=cfg.max_retries, backoff_base=0.25, backoff_max=10.0,
                        deadline_s=cfg.retry_deadline_s)
    client = RewardClient(cfg.url, model=cfg.model, label=cfg.label, api_key=cfg.api_key, timeout=cfg.timeout_s,
                          retry=retry, chunk_size=cfg.chunk_size, interrupt=stop)
    return RemoteRewardFn(client)
