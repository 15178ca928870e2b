"""HTTP routes of the generator: native `/v1/generate`, OpenAI-compatible `/v1/completions` and `/v1/models`, the
checkpoint list."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.generator.checkpoints import (
    BASE,
    LATEST,
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
    TokenLogprob,
    finish_stream,
    new_request_id,
    sampling_params,
    score_prompt,
    tokenize_prompts,
    within,
)
from services.generator.openai_compat import (
    LogprobsWriter,
    OpenAIError,
    check_request,
    check_vocab,
    completion_params,
    echoed,
)
from services.generator.scheduler import Scheduler
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
    OpenAIModel,
    OpenAIModelList,
)
from shared.server import RETRY_SOON, ApiError, batcher_errors, bearer_guard, request_id

log = logging.getLogger(__name__)
OWNER = "rlhf"  # `owned_by` of every model in the OpenAI list
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 500, 503)}


class GeneratorMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.tokens = Counter("generator_tokens_generated_total", "Completion tokens generated (streams: each token "
                              "as the model makes it, read or not)", registry=registry)
        self.batch_size = Histogram("generator_batch_size", "Sequences per decode step (continuous batching) or per "
                                    "generate call (static)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.batch_seconds = Histogram("generator_batch_seconds", "Seconds per decode step (continuous) or generate "
                                       "call (static)",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.first_token = Histogram("generator_time_to_first_token_seconds", "From a prompt's arrival in the queue "
                                     "to its first new token (static: to the end of its generate call, when its "
                                     "tokens appear)", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                                                10, 30), registry=registry)
        self.loaded = Gauge("generator_loaded_checkpoints", "Models in memory (base, loaded, evicted but in use, "
                            "loading)", registry=registry)

    def observe_batch(self, stats: BatchStats) -> None:
        if not stats.failed:
            self.batch_size.observe(stats.size)
            self.batch_seconds.observe(stats.seconds)


class Streams:
    """Admission for streamed sequences, which bypass the batching queue's bound: at most `limit` in flight (429
    beyond), none once closed (503). Continuous batching decodes them in the running batch; static batching runs
    their generate calls one at a time on the executor's thread (they take turns with batches on the model anyway),
    so waiting streams hold no thread the event loop needs. Streamed echo scores prompts on that thread too."""

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


RunStream = Callable[[GenerationItem, Callable[[int, TokenLogprob | None], None], Callable[[], bool]],
                     Awaitable[None]]


def build_router(settings: GeneratorSettings, store: CheckpointStore,
                 batcher: Batcher[GenerationItem, list[Completion]] | Scheduler, metrics: GeneratorMetrics,
                 not_ready: Callable[[], str | None], streams: Streams, run_stream: RunStream) -> APIRouter:
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
            results, timing = await batcher.submit(items, timeout=settings.batching.request_timeout_s)
        if isinstance(batcher, Batcher):  # the scheduler reports first tokens as it makes them
            for _ in items:
                metrics.first_token.observe(timing.queue + timing.compute)
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

    started = int(time.time())  # `created` of base: this server's start

    def openai_model(name: str, created: float | None) -> OpenAIModel:
        return OpenAIModel(id=name, created=int(created if created is not None else started), owned_by=OWNER)

    @router.get("/models", response_model=OpenAIModelList)
    async def models() -> OpenAIModelList:
        """OpenAI's model list: `base`, `latest` and every valid checkpoint, by the names `model` accepts."""
        valid = [c for c in await asyncio.to_thread(store.listing) if c.valid]
        return OpenAIModelList(data=[openai_model(BASE, None), openai_model(LATEST, valid[-1].time if valid else None),
                                     *(openai_model(c.name, c.time) for c in valid)])

    @router.get("/models/{model_id:path}", response_model=OpenAIModel)
    async def model(model_id: str) -> OpenAIModel:
        """One model of the list (`<run>/step-<N>` holds a slash: sent as is or percent-encoded)."""
        try:
            info = await asyncio.to_thread(store.resolve, model_id)
        except CheckpointNotFoundError:
            raise OpenAIError(404, "model_not_found", f"The model {model_id[:200]!r} does not exist",
                              param="model", code="model_not_found") from None
        except CheckpointInvalidError as exc:
            raise OpenAIError(409, "checkpoint_invalid", str(exc), param="model", code="checkpoint_invalid") from None
        return openai_model(model_id, info.time if info else None)

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        """OpenAI-compatible completions; `model` names the checkpoint; `stream: true` sends server-sent events.
        Parameters this server does not honour are refused (400), never ignored; see the README for the table."""
        check_request(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(422, "invalid_request", "prompt must not be an empty list")
        params = completion_params(req)
        check_limits(prompts, params, req.stream)
        policy = await policy_for(req.model)
        check_vocab(params, policy.vocab_size)
        items = prepare(policy, prompts, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": policy.name}
        if req.stream:
            usage = {"prompt_tokens": sum(len(it.prompt_ids) for it in items), "completion_tokens": 0}
            chunks = stream_choices(items, req, usage, request)
            with batcher_errors():  # admission (429, 503) and a model failing at once answer before the stream
                first = await anext(chunks)
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(first, chunks, meta, usage if include_usage else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await run(items)
        choices, used = [], 0
        for i, (item, per_prompt) in enumerate(zip(items, results)):
            for j, c in enumerate(per_prompt):
                prefix = item.prompt if req.echo else ""
                logprobs = None
                if req.logprobs is not None:
                    entries = echoed(item.prompt, c.prompt_logprobs) if req.echo else []
                    logprobs = LogprobsWriter(policy.tokenizer).render([*entries, *(c.logprobs or [])])
                choices.append({"text": prefix + c.completion, "index": i * req.n + j, "logprobs": logprobs,
                                "finish_reason": c.finish_reason})
                used += c.tokens
        prompt_tokens = sum(len(it.prompt_ids) for it in items)
        return {**meta, "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                                                      "total_tokens": prompt_tokens + used}}

    async def stream_choices(items: list[GenerationItem], req: CompletionRequest, usage: dict,
                             request: Request) -> AsyncIterator[dict]:
        """Each (prompt, choice) in turn, token by token, within the stream admission bound."""
        loop = asyncio.get_running_loop()
        with streams.hold(len(items) * req.n):
            for i, item in enumerate(items):
                scored = None
                if item.params.prompt_logprobs:  # once per prompt, on the stream thread (it uses the model)
                    scored = await loop.run_in_executor(streams.executor, score_prompt, item.policy, item.prompt_ids,
                                                        item.params.logprobs or 0)
                for j in range(req.n):
                    echo = (item.prompt, echoed(item.prompt, scored)) if req.echo else None
                    async for chunk in stream_one(_choice(item, j), i * req.n + j, echo, usage, request):
                        yield chunk

    async def stream_one(item: GenerationItem, index: int, echo: tuple[str, list[TokenLogprob]] | None,
                         usage: dict, request: Request) -> AsyncIterator[dict]:
        """One sequence as text deltas (the echoed prompt leads the first); generation stops within a token once
        the client is gone. Text that may yet turn out to start a stop string (or be half a character) is held
        back until it cannot; each chunk carries the logprobs of the tokens wholly inside what has been sent."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, TokenLogprob | None] | None] = asyncio.Queue()
        halt = threading.Event()
        policy, params = item.policy, item.params
        writer = LogprobsWriter(policy.tokenizer) if params.logprobs is not None else None
        lead, lead_logprobs = echo if echo else ("", [])

        def chunk(text: str, entries: list[TokenLogprob], finish_reason: str | None) -> dict:
            nonlocal lead, lead_logprobs
            body = {"text": lead + text, "index": index,
                    "logprobs": writer.render([*lead_logprobs, *entries]) if writer else None,
                    "finish_reason": finish_reason}
            lead, lead_logprobs = "", []
            return body

        def on_token(token: int, info: TokenLogprob | None) -> None:  # in the generate thread: counted as made
            metrics.tokens.inc()
            loop.call_soon_threadsafe(queue.put_nowait, (token, info))

        async def produce() -> None:
            try:
                await run_stream(item, on_token, halt.is_set)
            finally:  # after every token: they were queued (call_soon_threadsafe) before the run could end
                queue.put_nowait(None)

        job = asyncio.ensure_future(produce())
        ids: list[int] = []
        infos: list[TokenLogprob | None] = []
        sent, released = "", 0
        try:
            while (entry := await queue.get()) is not None:
                ids.append(entry[0])
                infos.append(entry[1])
                done = finish_stream(policy, ids, params)
                if done.finish_reason == "stop" or await request.is_disconnected():
                    halt.set()  # the generate thread ends at its next token
                    continue
                safe = done.completion[: len(done.completion) - _unsettled(done.completion, params.stop)]
                if len(safe) > len(sent) and safe.startswith(sent):
                    upto = within(policy, ids, len(safe)) if writer else released
                    yield chunk(safe[len(sent):], infos[released:upto], None)
                    sent, released = safe, upto
            await job
        finally:  # also when the response is cancelled (client gone) or closed: never generate for nobody
            halt.set()
        final = finish_stream(policy, ids, params)
        usage["completion_tokens"] += final.tokens
        tail = final.completion[len(sent):] if final.completion.startswith(sent) else ""
        yield chunk(tail, infos[released: final.kept], final.finish_reason)

    return router


def _unsettled(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` may still change: the longest end that starts a stop string, or
    replacement characters (a token that ends inside a UTF-8 character)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold


def _choice(item: GenerationItem, j: int) -> GenerationItem:
    """Choice `j` of a streamed prompt: one sequence, seeded `seed + j` so that choices differ yet repeat."""
    seed = None if item.params.seed is None else item.params.seed + j
    params = dataclasses.replace(item.params, seed=seed, num_return_sequences=1)
    return GenerationItem(item.policy, item.prompt, item.prompt_ids, params, item.request_id)


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


async def _sse(first: dict, rest: AsyncIterator[dict], meta: dict, usage: dict | None) -> AsyncIterator[bytes]:
    """The chunks as events; with `usage` (stream_options.include_usage) every chunk says `usage: null` and a last
    one, with no choices, the request's usage."""
    extra = {"usage": None} if usage is not None else {}
    yield _event({**meta, "choices": [first], **extra})
    try:
        async for choice in rest:
            yield _event({**meta, "choices": [choice], **extra})
        if usage is not None:
            total = usage["prompt_tokens"] + usage["completion_tokens"]
            yield _event({**meta, "choices": [], "usage": {**usage, "total_tokens": total}})
    except Exception as exc:  # headers are out: report in-band, as OpenAI does
        log.exception("request %s: streaming failed", request_id.get())
        yield _event({"error": {"type": "inference_error", "message": f"{type(exc).__name__}: {exc}",
                                "request_id": request_id.get()}})
    yield b"data: [DONE]\n\n"
