"""The live page at `/` and the API only it needs: the latest eval samples, the generator's checkpoints, and a
completion of a typed prompt by one of them, scored by the reward service. The browser talks to the trainer only:
the generator's and reward service's addresses (compose host names) are not reachable from it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from services.trainer.config import TrainerConfig
from services.trainer.tracking import TrainingStatus
from shared.clients import AsyncGeneratorClient, RetryPolicy, RewardClient, ServiceError
from shared.errors import RETRY_SOON, ApiError
from shared.schemas import CheckpointName, Text

PAGE = Path(__file__).parent / "static" / "page.html"
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 256
MAX_CONCURRENT_COMPLETIONS = 4  # each holds a generator slot and a reward call; more wait in the browser (429)
# Bounded calls: the page must get an answer, never wait on a dead service.
LIST_TIMEOUT_S, LIST_RETRY = 10.0, RetryPolicy(max_retries=1, deadline_s=10.0)
GENERATE_TIMEOUT_S, GENERATE_RETRY = 120.0, RetryPolicy(max_retries=2, deadline_s=120.0)
SCORE_TIMEOUT_S, SCORE_RETRY = 30.0, RetryPolicy(max_retries=2, deadline_s=30.0)


class CompleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: CheckpointName = Field(min_length=1, description="`base`, `latest` or `<run>/step-<N>`, as "
                                       "GET /v1/checkpoints names them.")
    prompt: Text = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The text to continue.")
    max_new_tokens: int = Field(40, ge=1, le=MAX_NEW_TOKENS, strict=True, description="Most tokens to add.")


def _page_with_policy() -> tuple[str, dict[str, str]]:
    """The page and its headers: a Content-Security-Policy that allows only the page's own inline script and style
    (by hash) and requests to the trainer itself, so nothing else can run in it or leave it."""
    html = PAGE.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def upstream_error(exc: ServiceError, service: str, url: str) -> ApiError:
    """A failed call to the generator or reward service as the page's answer: the generator's refusals of the
    request itself (unknown checkpoint, prompt too long) keep their status and message; a service that is down or
    busy is a 503, one that fails, refuses the trainer's key or its configured model a 502. Never a 500: the trainer
    is fine."""
    message = str(exc)
    if exc.type and message.startswith(f"{exc.status} {exc.type}: "):
        message = message.split(": ", 1)[1]  # the service's own message, without the status prefix
    if service == "generator" and exc.status in (404, 409, 413, 422):
        return ApiError(exc.status, exc.type or "invalid_request", message)
    if exc.status in (401, 403):
        return ApiError(502, "upstream_unauthorized", f"the {service} service at {url} refused the trainer's API "
                        f"key ({message}); give the trainer its key ({service.upper()}_API_KEY)")
    if exc.status in (None, 429, 503, 504):
        return ApiError(503, "upstream_unavailable", f"the {service} service at {url} is unavailable: {message}",
                        RETRY_SOON)
    return ApiError(502, "upstream_error", f"the {service} service at {url} failed: {message}")


def _generator_url(config: TrainerConfig) -> str:
    if not config.generator.url:  # not a fault nor a passing condition: this trainer has no such thing to offer
        raise ApiError(404, "not_found", "no generator service is configured (generator.url): checkpoints cannot be "
                       "listed or tried")
    return config.generator.url


def _generator(config: TrainerConfig, timeout: float, retry: RetryPolicy) -> AsyncGeneratorClient:
    return AsyncGeneratorClient(_generator_url(config), api_key=config.generator.api_key, timeout=timeout,
                                retry=retry)


async def _generate(config: TrainerConfig, req: CompleteRequest) -> dict:
    """One completion, sampled as the run's evals sample (gen_kwargs)."""
    g = config.method.gen_kwargs
    async with _generator(config, GENERATE_TIMEOUT_S, GENERATE_RETRY) as client:
        try:
            answer = await client.generate([req.prompt], req.checkpoint, max_new_tokens=req.max_new_tokens,
                                           do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p,
                                           top_k=g.top_k)
        except ServiceError as exc:
            raise upstream_error(exc, "generator", client.http.url) from None
    try:
        return {"checkpoint": answer["checkpoint"], "step": answer["step"], **answer["completions"][0]}
    except (KeyError, IndexError, TypeError) as exc:
        raise ApiError(502, "upstream_error", f"the generator service answered without a completion ({exc!r})") \
            from None


def _score(config: TrainerConfig, text: str) -> float:
    """The reward of prompt + completion, as the run scores its samples (blocking: run it in a thread)."""
    r = config.reward
    with RewardClient(r.url, model=r.model, label=r.label, api_key=r.api_key, timeout=SCORE_TIMEOUT_S,
                      retry=SCORE_RETRY) as client:
        try:
            return client.score([text])[0]
        except ServiceError as exc:
            raise upstream_error(exc, "reward", r.url) from None


def add_page_routes(app: FastAPI, status: TrainingStatus, config: TrainerConfig, guard: list) -> None:
    """GET / (public: the page holds no data and no secret) and the guarded API it reads besides /v1/status and
    /v1/metrics."""
    html, headers = _page_with_policy()
    completions = asyncio.Semaphore(MAX_CONCURRENT_COMPLETIONS)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    @app.get("/v1/samples", dependencies=guard)
    async def samples() -> dict:
        """The latest eval's samples: step, prompt, completion and score of each."""
        return {"samples": list(status.eval_samples)}

    @app.get("/v1/checkpoints", dependencies=guard)
    async def checkpoints() -> dict:
        """The generator's checkpoints (base and this run's), as its GET /v1/checkpoints lists them."""
        async with _generator(config, LIST_TIMEOUT_S, LIST_RETRY) as client:
            try:
                return {"checkpoints": await client.checkpoints()}
            except ServiceError as exc:
                raise upstream_error(exc, "generator", client.http.url) from None

    @app.post("/v1/complete", dependencies=guard)
    async def complete(req: CompleteRequest) -> dict:
        """Continue `prompt` with `checkpoint` through the generator and score the text with the reward service."""
        if completions.locked():
            raise ApiError(429, "overloaded", f"{MAX_CONCURRENT_COMPLETIONS} completions are already running; retry",
                           RETRY_SOON)
        async with completions:
            done = await _generate(config, req)
            score = await asyncio.to_thread(_score, config, done["text"])
        return {**done, "score": score}
