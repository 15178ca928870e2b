"""HTTP routes of the generator: native `/v1/generate`, OpenAI-compatible `/v1/completions`, the checkpoint list."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.generator.checkpoints import (
    BASE,
    CheckpointInvalidError,
    CheckpointNotFoundError,
    CheckpointStore,
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
    tokenize_prompts,
)
from services.generator.settings import GeneratorSettings
from shared.batching import Batcher, BatchStats, BatchTimeoutError, QueueFullError
from shared.schemas import (
    CheckpointEntry,
    CheckpointList,
    CompletionRequest,
    ErrorResponse,
    GeneratedText,
    GenerateRequest,
    GenerateResponse,
)
from shared.server import ApiError, bearer_guard

log = logging.getLogger(__name__)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 500, 503)}


class GeneratorMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.tokens = Counter("generator_tokens_generated_total", "Completion tokens generated", registry=registry)
        self.batch_size = Histogram("generator_batch_size", "Sequences per generate call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.batch_seconds = Histogram("generator_batch_seconds", "Seconds per generate call",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.loaded = Gauge("generator_loaded_checkpoints", "Checkpoints in memory (base included)",
                            registry=registry)

    def observe_batch(self, stats: BatchStats) -> None:
        if not stats.failed:
            self.batch_size.observe(stats.size)
            self.batch_seconds.observe(stats.seconds)


def build_router(settings: GeneratorSettings, store: CheckpointStore,
                 batcher: Batcher[GenerationItem, list[Completion]], metrics: GeneratorMetrics) -> APIRouter:
    router = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=[Depends(bearer_guard(lambda: settings.api_key))])

    async def policy_for(checkpoint: str) -> LoadedPolicy:
        try:
            policy = await store.get(checkpoint)
        except CheckpointNotFoundError as exc:
            raise ApiError(404, "checkpoint_not_found", str(exc)) from None
        except CheckpointInvalidError as exc:
            raise ApiError(409, "checkpoint_invalid", str(exc)) from None
        except NotReadyError as exc:
            raise ApiError(503, "unavailable", str(exc), {"Retry-After": "1"}) from None
        metrics.loaded.set(len(store.loaded_names))
        return policy

    def check_limits(prompts: list[str], params: SamplingParams) -> None:
        if len(prompts) > settings.max_prompts_per_request:
            raise ApiError(413, "payload_too_large", f"{len(prompts)} prompts in one request; the limit is "
                           f"{settings.max_prompts_per_request}")
        if params.max_new_tokens > settings.max_new_tokens_limit:
            raise ApiError(422, "invalid_request", f"max_new_tokens {params.max_new_tokens} exceeds the limit "
                           f"{settings.max_new_tokens_limit}")
        if params.num_return_sequences > settings.max_num_return_sequences:
            raise ApiError(422, "invalid_request", f"num_return_sequences {params.num_return_sequences} exceeds "
                           f"the limit {settings.max_num_return_sequences}")
        if len(prompts) * params.num_return_sequences > settings.batching.max_queue_size:
            raise ApiError(413, "payload_too_large", "prompts x num_return_sequences exceeds the queue size "
                           f"{settings.batching.max_queue_size}")
        for i, prompt in enumerate(prompts):
            if len(prompt) > 20 * settings.max_prompt_tokens:  # no tokenizer needed to refuse a novel
                raise ApiError(413, "payload_too_large", f"prompts[{i}] is far longer than "
                               f"{settings.max_prompt_tokens} tokens")

    def prepare(policy: LoadedPolicy, prompts: list[str], params: SamplingParams) -> list[GenerationItem]:
        ids = tokenize_prompts(policy, prompts)
        request_id = new_request_id()
        for i, seq in enumerate(ids):
            if len(seq) > settings.max_prompt_tokens:
                raise ApiError(413, "payload_too_large", f"prompts[{i}] has {len(seq)} tokens; the limit is "
                               f"{settings.max_prompt_tokens}")
            if len(seq) + params.max_new_tokens > policy.max_positions:
                raise ApiError(422, "invalid_request", f"prompts[{i}] ({len(seq)} tokens) + max_new_tokens "
                               f"{params.max_new_tokens} exceeds the model's context of {policy.max_positions}")
        return [GenerationItem(policy, p, seq, params, request_id) for p, seq in zip(prompts, ids)]

    async def run(items: list[GenerationItem]) -> list[list[Completion]]:
        try:
            results, _ = await batcher.submit(items, timeout=settings.batching.request_timeout_s)
        except QueueFullError as exc:
            raise ApiError(429, "overloaded", str(exc), {"Retry-After": "1"}) from None
        except BatchTimeoutError as exc:
            raise ApiError(503, "timeout", str(exc), {"Retry-After": "1"}) from None
        except Exception as exc:
            log.exception("generation failed")
            raise ApiError(500, "generation_error", f"generation failed: {type(exc).__name__}: {exc}") from None
        metrics.tokens.inc(sum(c.tokens for per_prompt in results for c in per_prompt))
        return results

    @router.post("/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        """Continue each prompt with the chosen checkpoint."""
        params = SamplingParams(req.max_new_tokens, req.do_sample, req.temperature, req.top_p, req.top_k, req.seed,
                                req.num_return_sequences, tuple(req.stop))
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
        loaded = set(store.loaded_names)
        entries = [CheckpointEntry(name=BASE, run=None, step=None, time=None, metrics={}, valid=True, error=None,
                                   loaded=BASE in loaded, latest=latest == BASE)]
        entries += [CheckpointEntry(name=c.name, run=c.run, step=c.step, time=c.time, metrics=c.metrics,
                                    valid=c.valid, error=c.error, loaded=c.name in loaded, latest=c.name == latest)
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
        params = SamplingParams(req.max_tokens, req.temperature > 0, req.temperature or 1.0, req.top_p, 0, req.seed,
                                req.n, stop)
        check_limits(prompts, params)
        policy = await policy_for(req.model)
        items = prepare(policy, prompts, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": policy.name}
        if req.stream:
            return StreamingResponse(_sse(stream_choices(items, req.n, request), meta),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
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
        """Each (prompt, choice) in turn, token by token; stops generating when the client goes away."""
        loop = asyncio.get_running_loop()
        for i, item in enumerate(items):
            for j in range(n):
                params = item.params
                seed = None if params.seed is None else params.seed + j
                one = GenerationItem(item.policy, item.prompt, item.prompt_ids,
                                     SamplingParams(params.max_new_tokens, params.do_sample, params.temperature,
                                                    params.top_p, params.top_k, seed, 1, params.stop),
                                     item.request_id)
                queue: asyncio.Queue[int | None] = asyncio.Queue()
                halt = threading.Event()
                push = functools.partial(loop.call_soon_threadsafe, queue.put_nowait)  # from the generate thread
                job = loop.run_in_executor(None, _stream_job, one, push, functools.partial(push, None), halt.is_set)
                ids: list[int] = []
                sent = ""
                while (token := await queue.get()) is not None:
                    ids.append(token)
                    done = finish_stream(one.policy, ids, params.stop)
                    if done.finish_reason == "stop" or await request.is_disconnected():
                        halt.set()  # the generate thread ends at its next token
                    elif len(done.completion) > len(sent):
                        yield {"text": done.completion[len(sent):], "index": i * n + j, "finish_reason": None}
                        sent = done.completion
                await job
                final = finish_stream(one.policy, ids, params.stop)
                metrics.tokens.inc(final.tokens)
                tail = final.completion[len(sent):] if final.completion.startswith(sent) else ""
                yield {"text": tail, "index": i * n + j, "finish_reason": final.finish_reason}

    return router


def _stream_job(item: GenerationItem, on_token, on_end, should_stop) -> None:
    try:
        generate_streaming(item, on_token, should_stop)
    finally:
        on_end()


async def _sse(chunks: AsyncIterator[dict], meta: dict) -> AsyncIterator[bytes]:
    try:
        async for choice in chunks:
            yield f"data: {json.dumps({**meta, 'choices': [{**choice, 'logprobs': None}]})}\n\n".encode()
    except Exception as exc:  # headers are out: report in-band, as OpenAI does
        log.exception("streaming failed")
        yield f"data: {json.dumps({'error': {'type': 'generation_error', 'message': str(exc)}})}\n\n".encode()
    yield b"data: [DONE]\n\n"
