"""HTTP routes of the generator: native `/v1/generate`, OpenAI-compatible `/v1/completions`, the checkpoint list."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.generator.checkpoints import (
    BASE,
    CheckpointInvalidError,
    CheckpointNotFoundError,
    CheckpointStore,
    LoadCapacityError,
    LoadedPolicy,
    NotReadyError,
)
from services.generator.engine import (
    Completion,
    GenerationItem,
    SamplingParams,
    finish_stream,
    generate_streaming,
    new_request_id,
    sampling_params,
    tokenize_prompts,
)
from services.generator.settings import GeneratorSettings
from shared.batching import Batcher, BatchStats
from shared.schemas import (
    CheckpointEntry,
    CheckpointList,
    CompletionRequest,
    ErrorResponse,
    GeneratedText,
    GenerateRequest,
    GenerateResponse,
)
from shared.server import RETRY_SOON, ApiError, batcher_errors, bearer_guard, request_id

log = logging.getLogger(__name__)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 500, 503)}


class GeneratorMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.tokens = Counter("generator_tokens_generated_total", "Completion tokens generated (streams: each token "
                              "as the model makes it, read or not)", registry=registry)
        self.batch_size = Histogram("generator_batch_size", "Sequences per generate call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.batch_seconds = Histogram("generator_batch_seconds", "Seconds per generate call",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.loaded = Gauge("generator_loaded_checkpoints", "Models in memory (base, loaded, evicted but in use, "
                            "loading)", registry=registry)

    def observe_batch(self, stats: BatchStats) -> None:
        if not stats.failed:
            self.batch_size.observe(stats.size)
            self.batch_seconds.observe(stats.seconds)


class Streams:
    """Admission for streamed sequences, which bypass the batcher: at most `limit` in flight (429 beyond), none once
    closed (503). Their generate calls run one at a time on a thread of their own (they take turns with batches on
    the model anyway), so waiting streams hold no thread the event loop needs."""

    def __init__(self, limit: int):
        self.limit, self.used, self.closed = limit, 0, False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream")

    @contextmanager
    def hold(self, count: int) -> Iterator[None]:
        if self.closed:
            raise ApiError(503, "unavailable", "the service is shutting down; retry", RETRY_SOON)
        if self.used + count > self.limit:
            raise ApiError(429, "overloaded", f"{self.used} of {self.limit} streamed sequences in flight; retry "
                           "later", RETRY_SOON)
        self.used += count
        try:
            yield
        finally:
            self.used -= count

    def close(self) -> None:
        self.closed = True
        self.executor.shutdown(wait=False)


def build_router(settings: GeneratorSettings, store: CheckpointStore,
                 batcher: Batcher[GenerationItem, list[Completion]], metrics: GeneratorMetrics,
                 not_ready: Callable[[], str | None], streams: Streams) -> APIRouter:
    def ready() -> None:  # while the base model loads every route says 503, never 404 for a checkpoint
        if (reason := not_ready()) is not None:
            raise ApiError(503, "unavailable", f"{reason}; retry", RETRY_SOON)

    guards = [Depends(bearer_guard(lambda: settings.api_key)), Depends(ready)]
    router = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=guards)

    async def policy_for(checkpoint: str) -> LoadedPolicy:
        try:
            return await store.get(checkpoint)
        except CheckpointNotFoundError as exc:
            raise ApiError(404, "checkpoint_not_found", str(exc)) from None
        except CheckpointInvalidError as exc:
            raise ApiError(409, "checkpoint_invalid", str(exc)) from None
        except LoadCapacityError as exc:
            raise ApiError(429, "overloaded", str(exc), RETRY_SOON) from None
        except NotReadyError as exc:
            raise ApiError(503, "unavailable", str(exc), RETRY_SOON) from None

    def check_limits(prompts: list[str], params: SamplingParams, stream: bool = False) -> None:
        if len(prompts) > settings.max_prompts_per_request:
            raise ApiError(413, "payload_too_large", f"{len(prompts)} prompts in one request; the limit is "
                           f"{settings.max_prompts_per_request}")
        if params.max_new_tokens > settings.max_new_tokens_limit:
            raise ApiError(422, "invalid_request", f"max_new_tokens {params.max_new_tokens} exceeds the limit "
                           f"{settings.max_new_tokens_limit}")
        if params.num_return_sequences > settings.max_num_return_sequences:
            raise ApiError(422, "invalid_request", f"num_return_sequences {params.num_return_sequences} exceeds "
                           f"the limit {settings.max_num_return_sequences}")
        bound, what = ((settings.batching.max_streams, "streamed sequences") if stream
                       else (settings.batching.max_queue_size, "the queue size"))
        if len(prompts) * params.num_return_sequences > bound:
            raise ApiError(413, "payload_too_large", f"prompts x num_return_sequences exceeds {what} {bound}")
        for i, prompt in enumerate(prompts):
            if len(prompt) > 20 * settings.max_prompt_tokens:  # no tokenizer needed to refuse a novel
                raise ApiError(413, "payload_too_large", f"prompts[{i}] is far longer than "
                               f"{settings.max_prompt_tokens} tokens")

    def prepare(policy: LoadedPolicy, prompts: list[str], params: SamplingParams) -> list[GenerationItem]:
        ids = tokenize_prompts(policy, prompts)
        rid = new_request_id()
        for i, seq in enumerate(ids):
            if len(seq) > settings.max_prompt_tokens:
                raise ApiError(413, "payload_too_large", f"prompts[{i}] has {len(seq)} tokens; the limit is "
                               f"{settings.max_prompt_tokens}")
            if len(seq) + params.max_new_tokens > policy.max_positions:
                raise ApiError(422, "invalid_request", f"prompts[{i}] ({len(seq)} tokens) + max_new_tokens "
                               f"{params.max_new_tokens} exceeds the model's context of {policy.max_positions}")
        return [GenerationItem(policy, p, seq, params, rid) for p, seq in zip(prompts, ids)]

    async def run(items: list[GenerationItem]) -> list[list[Completion]]:
        with batcher_errors():
            results, _ = await batcher.submit(items, timeout=settings.batching.request_timeout_s)
        metrics.tokens.inc(sum(c.tokens for per_prompt in results for c in per_prompt))
        return results

    @router.post("/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        """Continue each prompt with the chosen checkpoint."""
        params = sampling_params(req.max_new_tokens, req.temperature, req.top_p, req.top_k, req.seed,
                                 req.num_return_sequences, tuple(req.stop), req.do_sample)
        check_limits(req.prompts, params)
        policy = await policy_for(req.checkpoint)
        results = await run(prepare(policy, req.prompts, params))
        completions = [
            GeneratedText(prompt=prompt, completion=c.completion, text=prompt + c.completion,
                          finish_reason=c.finish_reason, tokens=c.tokens, index=i)
            for i, (prompt, per_prompt) in enumerate(zip(req.prompts, results)) for c in per_prompt
        ]
        return GenerateResponse(checkpoint=policy.name, step=policy.step, completions=completions)

    @router.get("/checkpoints", response_model=CheckpointList)
    async def checkpoints() -> CheckpointList:
        """The base model and every complete checkpoint, with step and manifest metrics."""
        found = await asyncio.to_thread(store.listing)
        valid = [c for c in found if c.valid]
        latest = valid[-1].name if valid else BASE
        entries = [CheckpointEntry(name=BASE, run=None, step=None, time=None, metrics={}, valid=True, error=None,
                                   loaded=store.base is not None, latest=latest == BASE)]
        entries += [CheckpointEntry(name=c.name, run=c.run, step=c.step, time=c.time, metrics=c.metrics,
                                    valid=c.valid, error=c.error, loaded=store.is_loaded(c), latest=c.name == latest)
                    for c in found]
        return CheckpointList(checkpoints=entries)

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        """OpenAI-compatible completions; `model` names the checkpoint; `stream: true` sends server-sent events."""
        if req.logprobs is not None or (req.best_of not in (None, 1)):
            raise ApiError(422, "invalid_request", "logprobs and best_of are not supported")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(422, "invalid_request", "prompt must not be an empty list")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        params = sampling_params(req.max_tokens, req.temperature, req.top_p, 0, req.seed, req.n, stop)
        check_limits(prompts, params, req.stream)
        policy = await policy_for(req.model)
        items = prepare(policy, prompts, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": policy.name}
        if req.stream:
            chunks = stream_choices(items, req.n, request)
            with batcher_errors():  # admission (429, 503) and a model failing at once answer before the stream
                first = await anext(chunks)
            return StreamingResponse(_sse(first, chunks, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        results = await run(items)
        choices, used = [], 0
        for i, (item, per_prompt) in enumerate(zip(items, results)):
            for j, c in enumerate(per_prompt):
                text = (item.prompt if req.echo else "") + c.completion
                choices.append({"text": text, "index": i * req.n + j, "logprobs": None,
                                "finish_reason": c.finish_reason})
                used += c.tokens
        prompt_tokens = sum(len(it.prompt_ids) for it in items)
        return {**meta, "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                                                      "total_tokens": prompt_tokens + used}}

    async def stream_choices(items: list[GenerationItem], n: int, request: Request) -> AsyncIterator[dict]:
        """Each (prompt, choice) in turn, token by token, within the stream admission bound."""
        with streams.hold(len(items) * n):
            for i, item in enumerate(items):
                for j in range(n):
                    async for chunk in stream_one(_choice(item, j), i * n + j, request):
                        yield chunk

    async def stream_one(item: GenerationItem, index: int, request: Request) -> AsyncIterator[dict]:
        """One sequence as text deltas; generation stops within a token once the client is gone."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        halt = threading.Event()

        def on_token(token: int) -> None:  # in the generate thread: counted as made, whether read or not
            metrics.tokens.inc()
            loop.call_soon_threadsafe(queue.put_nowait, token)

        def on_end() -> None:
            loop.call_soon_threadsafe(queue.put_nowait, None)

        job = loop.run_in_executor(streams.executor, _stream_job, item, on_token, on_end, halt.is_set)
        ids: list[int] = []
        sent = ""
        try:
            while (token := await queue.get()) is not None:
                ids.append(token)
                done = finish_stream(item.policy, ids, item.params.stop)
                if done.finish_reason == "stop" or await request.is_disconnected():
                    halt.set()  # the generate thread ends at its next token
                elif len(done.completion) > len(sent):
                    yield {"text": done.completion[len(sent):], "index": index, "finish_reason": None}
                    sent = done.completion
            await job
        finally:  # also when the response is cancelled (client gone) or closed: never generate for nobody
            halt.set()
        final = finish_stream(item.policy, ids, item.params.stop)
        tail = final.completion[len(sent):] if final.completion.startswith(sent) else ""
        yield {"text": tail, "index": index, "finish_reason": final.finish_reason}

    return router


def _choice(item: GenerationItem, j: int) -> GenerationItem:
    """Choice `j` of a streamed prompt: one sequence, seeded `seed + j` so that choices differ yet repeat."""
    seed = None if item.params.seed is None else item.params.seed + j
    params = dataclasses.replace(item.params, seed=seed, num_return_sequences=1)
    return GenerationItem(item.policy, item.prompt, item.prompt_ids, params, item.request_id)


def _stream_job(item: GenerationItem, on_token, on_end, should_stop) -> None:
    try:
        generate_streaming(item, on_token, should_stop)
    finally:
        on_end()


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


async def _sse(first: dict, rest: AsyncIterator[dict], meta: dict) -> AsyncIterator[bytes]:
    yield _event({**meta, "choices": [{**first, "logprobs": None}]})
    try:
        async for choice in rest:
            yield _event({**meta, "choices": [{**choice, "logprobs": None}]})
    except Exception as exc:  # headers are out: report in-band, as OpenAI does
        log.exception("request %s: streaming failed", request_id.get())
        yield _event({"error": {"type": "inference_error", "message": f"{type(exc).__name__}: {exc}",
                                "request_id": request_id.get()}})
    yield b"data: [DONE]\n\n"
