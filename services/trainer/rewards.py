"""Turning a reward function's answer into trustworthy scores, and waiting for the reward service."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from services.trainer.config import RewardConfig
from shared.clients import RemoteRewardFn, RetryPolicy, RewardClient
from shared.readiness import NotReady, wait_until_ready
from shared.replicas import split_urls
from shared.scores import one_finite_score_each

log = logging.getLogger(__name__)
RewardFn = Callable[..., Sequence[float]]


class RewardError(RuntimeError):
    """The reward function broke its contract; the update is skipped and the run stops with this message."""


def checked_scores(raw, expected: int) -> list[float]:
    """Exactly one finite number per sample, or RewardError. A bad score must never reach an update."""
    return one_finite_score_each(raw, expected, "reward function", RewardError)


def wait_for_reward_service(url: str | Sequence[str], deadline_s: float, on_wait: Callable[[str], None] | None = None,
                            api_key: str | None = None, stop: threading.Event | None = None) -> None:
    """Wait until `/readyz` answers 200 (shared/readiness.py), saying so while waiting; a set `stop` ends the wait
    with CallInterrupted. Several URLs (a list or comma-separated, the replicas): until one of them is ready; the
    reward function skips the others until they are. RewardError when the service is not ready in `deadline_s`
    seconds, or at once when its model failed to load."""
    where = ", ".join(split_urls(url))

    def waiting(reason: str) -> None:
        message = f"waiting for the reward service at {where} ({reason})"
        log.warning(message)
        if on_wait:
            on_wait(message)

    try:
        wait_until_ready(url, deadline_s, headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                         on_wait=waiting, stop=stop)
    except NotReady as exc:
        raise RewardError(f"reward service not ready: {exc}") from None


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
