"""`reward.retry_deadline_s`: one scoring call of the trainer, retries included, ends within its time budget."""

from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from services.trainer.config import RewardConfig
from services.trainer.rewards import remote_reward_fn
from shared.clients import ServiceError


def test_a_reward_service_that_keeps_failing_fails_the_call_at_the_deadline(serve):
    overloaded = FastAPI()
    calls = []

    @overloaded.post("/v1/score")
    async def score() -> JSONResponse:
        calls.append(time.monotonic())
        return JSONResponse({"detail": "overloaded"}, status_code=503)

    server = serve(overloaded, ready_path="/docs")
    assert RewardConfig().retry_deadline_s == 600
    reward_fn = remote_reward_fn(RewardConfig(url=server.url, max_retries=1000, retry_deadline_s=2.0))
    started = time.monotonic()
    with pytest.raises(ServiceError):
        reward_fn(["a fine film"])
    took = time.monotonic() - started
    assert len(calls) >= 3 and took <= 2.5  # retried, then gave up within the budget, not after 1000 tries
