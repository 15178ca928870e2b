"""HTTP routes of the generator: native `/v1/generate`, OpenAI-compatible `/v1/completions` and `/v1/models`, the
checkpoint list. Generation, streaming included (streaming.py), happens below; this layer checks limits, picks the
checkpoint and frames answers. Failures of the layers below answer by shared.errors' table."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.generator.checkpoints import (
    BASE,
    LATEST,
    CheckpointInvalidError,
    CheckpointNotFoundError,
    CheckpointStore,
    LoadedPolicy,
)
from services.generator.engine import (
    Completion,
    GenerationItem,
    SamplingParams,
    TokenLogprob,
    new_request_id,
    sampling_params,
    tokenize_prompts,
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
from services.generator.streaming import RunStream, Streams, nth_choice, text_deltas
from shared.batching import Batcher, BatchStats
from shared.errors import ApiError, UnavailableError
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
from shared.server import batcher_errors, bearer_guard, request_id

log = logging.getLogger(__name__)
OWNER = "rlhf"  # `owned_by` of every model in the OpenAI list
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 500, 503)}
AnyBatcher = Batcher[GenerationItem, list[Completion]] | Scheduler


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


def build_router(settings: GeneratorSettings, store: CheckpointStore, batcher: AnyBatcher, metrics: GeneratorMetrics,
                 not_ready: Callable[[], str | None], streams: Streams, run_stream: RunStream) -> APIRouter:
    def ready() -> None:  # while the base model loads every route says 503, never 404 for a checkpoint
        if (reason := not_ready()) is not None:
            raise UnavailableError(f"{reason}; retry")

    guards = [Depends(bearer_guard(lambda: settings.api_key)), Depends(ready)]
    router = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=guards)
    api = GeneratorApi(settings, store, batcher, metrics, streams, run_stream)
    router.add_api_route("/generate", api.generate, methods=["POST"], response_model=GenerateResponse)
    router.add_api_route("/checkpoints", api.checkpoints, methods=["GET"], response_model=CheckpointList)
    router.add_api_route("/models", api.models, methods=["GET"], response_model=OpenAIModelList)
    router.add_api_route("/models/{model_id:path}", api.model, methods=["GET"], response_model=OpenAIModel)
    router.add_api_route("/completions", api.completions, methods=["POST"])
    return router


class GeneratorApi:
    """The endpoints (public methods) and the steps they share: limits, checkpoint lookup, tokenizing, batching."""

    def __init__(self, settings: GeneratorSettings, store: CheckpointStore, batcher: AnyBatcher,
                 metrics: GeneratorMetrics, streams: Streams, run_stream: RunStream):
        self.settings, self.store, self.batcher, self.metrics = settings, store, batcher, metrics
        self.streams, self.run_stream = streams, run_stream
        self.started = int(time.time())  # `created` of base: this server's start

    # -- the steps every generation takes ----------------------------------------------------------------------------

    async def _policy_for(self, checkpoint: str) -> LoadedPolicy:
        try:
            return await self.store.get(checkpoint)
        except CheckpointNotFoundError as exc:
            raise ApiError(404, "checkpoint_not_found", str(exc)) from None
        except CheckpointInvalidError as exc:
            raise ApiError(409, "checkpoint_invalid", str(exc)) from None

    def _check_limits(self, prompts: list[str], params: SamplingParams, stream: bool = False) -> None:
        s = self.settings
        if len(prompts) > s.max_prompts_per_request:
            raise ApiError(413, "payload_too_large", f"{len(prompts)} prompts in one request; the limit is "
                           f"{s.max_prompts_per_request}")
        if params.max_new_tokens > s.max_new_tokens_limit:
            raise ApiError(422, "invalid_request", f"max_new_tokens {params.max_new_tokens} exceeds the limit "
                           f"{s.max_new_tokens_limit}")
        if params.num_return_sequences > s.max_num_return_sequences:
            raise ApiError(422, "invalid_request", f"num_return_sequences {params.num_return_sequences} exceeds "
                           f"the limit {s.max_num_return_sequences}")
        bound, what = ((s.batching.max_streams, "streamed sequences") if stream
                       else (s.batching.max_queue_size, "the queue size"))
        if len(prompts) * params.num_return_sequences > bound:
            raise ApiError(413, "payload_too_large", f"prompts x num_return_sequences exceeds {what} {bound}")
        for i, prompt in enumerate(prompts):
            if len(prompt) > 20 * s.max_prompt_tokens:  # no tokenizer needed to refuse a novel
                raise ApiError(413, "payload_too_large", f"prompts[{i}] is far longer than "
                               f"{s.max_prompt_tokens} tokens")

    def _prepare(self, policy: LoadedPolicy, prompts: list[str], params: SamplingParams) -> list[GenerationItem]:
        ids = tokenize_prompts(policy, prompts)
        limit = self.settings.max_prompt_tokens
        for i, seq in enumerate(ids):
            if len(seq) > limit:
                raise ApiError(413, "payload_too_large", f"prompts[{i}] has {len(seq)} tokens; the limit is {limit}")
            if len(seq) + params.max_new_tokens > policy.max_positions:
                raise ApiError(422, "invalid_request", f"prompts[{i}] ({len(seq)} tokens) + max_new_tokens "
                               f"{params.max_new_tokens} exceeds the model's context of {policy.max_positions}")
        rid = new_request_id()
        return [GenerationItem(policy, p, seq, params, rid) for p, seq in zip(prompts, ids)]

    async def _run(self, items: list[GenerationItem]) -> list[list[Completion]]:
        with batcher_errors():
            results, timing = await self.batcher.submit(items, timeout=self.settings.batching.request_timeout_s)
        if isinstance(self.batcher, Batcher):  # the scheduler reports first tokens as it makes them
            for _ in items:
                self.metrics.first_token.observe(timing.queue + timing.compute)
        self.metrics.tokens.inc(sum(c.tokens for per_prompt in results for c in per_prompt))
        return results

    # -- native API ----------------------------------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        """Continue each prompt with the chosen checkpoint."""
        params = sampling_params(req.max_new_tokens, req.temperature, req.top_p, req.top_k, req.seed,
                                 req.num_return_sequences, tuple(req.stop), req.do_sample)
        self._check_limits(req.prompts, params)
        policy = await self._policy_for(req.checkpoint)
        results = await self._run(self._prepare(policy, req.prompts, params))
        completions = [
            GeneratedText(prompt=prompt, completion=c.completion, text=prompt + c.completion,
                          finish_reason=c.finish_reason, tokens=c.tokens, index=i)
            for i, (prompt, per_prompt) in enumerate(zip(req.prompts, results)) for c in per_prompt
        ]
        return GenerateResponse(checkpoint=policy.name, step=policy.step, completions=completions)

    async def checkpoints(self) -> CheckpointList:
        """The base model and every complete checkpoint, with step and manifest metrics."""
        store = self.store
        found = await asyncio.to_thread(store.listing)
        valid = [c for c in found if c.valid]
        latest = valid[-1].name if valid else BASE
        entries = [CheckpointEntry(name=BASE, run=None, step=None, time=None, metrics={}, valid=True, error=None,
                                   loaded=store.base is not None, latest=latest == BASE)]
        entries += [CheckpointEntry(name=c.name, run=c.run, step=c.step, time=c.time, metrics=c.metrics,
                                    valid=c.valid, error=c.error, loaded=store.is_loaded(c), latest=c.name == latest)
                    for c in found]
        return CheckpointList(checkpoints=entries)

    # -- OpenAI API ----------------------------------------------------------------------------------------------------

    def _openai_model(self, name: str, created: float | None) -> OpenAIModel:
        return OpenAIModel(id=name, created=int(created if created is not None else self.started), owned_by=OWNER)

    async def models(self) -> OpenAIModelList:
        """OpenAI's model list: `base`, `latest` and every valid checkpoint, by the names `model` accepts."""
        valid = [c for c in await asyncio.to_thread(self.store.listing) if c.valid]
        return OpenAIModelList(data=[self._openai_model(BASE, None),
                                     self._openai_model(LATEST, valid[-1].time if valid else None),
                                     *(self._openai_model(c.name, c.time) for c in valid)])

    async def model(self, model_id: str) -> OpenAIModel:
        """One model of the list (`<run>/step-<N>` holds a slash: sent as is or percent-encoded)."""
        try:
            info = await asyncio.to_thread(self.store.resolve, model_id)
        except CheckpointNotFoundError:
            raise OpenAIError(404, "model_not_found", f"The model {model_id[:200]!r} does not exist",
                              param="model", code="model_not_found") from None
        except CheckpointInvalidError as exc:
            raise OpenAIError(409, "checkpoint_invalid", str(exc), param="model", code="checkpoint_invalid") from None
        return self._openai_model(model_id, info.time if info else None)

    async def completions(self, req: CompletionRequest, request: Request):
        """OpenAI-compatible completions; `model` names the checkpoint; `stream: true` sends server-sent events.
        Parameters this server does not honour are refused (400), never ignored; see the README for the table."""
        check_request(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(422, "invalid_request", "prompt must not be an empty list")
        params = completion_params(req)
        self._check_limits(prompts, params, req.stream)
        policy = await self._policy_for(req.model)
        check_vocab(params, policy.vocab_size)
        items = self._prepare(policy, prompts, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": policy.name}
        if req.stream:
            return await self._stream_response(items, req, meta, request)
        choices, used = _completion_choices(items, await self._run(items), req, policy)
        prompt_tokens = sum(len(it.prompt_ids) for it in items)
        return {**meta, "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                                                      "total_tokens": prompt_tokens + used}}

    # -- OpenAI streaming: the engine's text deltas, framed as chunks and server-sent events ---------------------------

    async def _stream_response(self, items: list[GenerationItem], req: CompletionRequest, meta: dict,
                               request: Request) -> StreamingResponse:
        usage = {"prompt_tokens": sum(len(it.prompt_ids) for it in items), "completion_tokens": 0}
        chunks = self._stream_choices(items, req, usage, request)
        with batcher_errors():  # admission (429, 503) and a model failing at once answer before the stream
            first = await anext(chunks)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_sse(first, chunks, meta, usage if include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _stream_choices(self, items: list[GenerationItem], req: CompletionRequest, usage: dict,
                              request: Request) -> AsyncIterator[dict]:
        """Each (prompt, choice) in turn, token by token, within the stream admission bound."""
        with self.streams.hold(len(items) * req.n):
            for i, item in enumerate(items):
                scored = await self.streams.score_prompt(item) if item.params.prompt_logprobs else None  # once
                for j in range(req.n):
                    lead = (item.prompt, echoed(item.prompt, scored)) if req.echo else ("", [])
                    async for chunk in self._choice_chunks(nth_choice(item, j), i * req.n + j, lead, usage, request):
                        yield chunk

    async def _choice_chunks(self, item: GenerationItem, index: int, lead: tuple[str, list[TokenLogprob]],
                             usage: dict, request: Request) -> AsyncIterator[dict]:
        """One sequence as OpenAI choice chunks; the echoed prompt (`lead`) leads the first; the last one has the
        finish reason. Each carries the logprobs of the tokens wholly inside the text sent so far."""
        writer = LogprobsWriter(item.policy.tokenizer) if item.params.logprobs is not None else None
        text, entries = lead
        async for delta in text_deltas(item, self.run_stream, request.is_disconnected, self.metrics.tokens.inc):
            if delta.finish_reason is not None:
                usage["completion_tokens"] += delta.tokens
            yield {"text": text + delta.text, "index": index,
                   "logprobs": writer.render([*entries, *delta.logprobs]) if writer else None,
                   "finish_reason": delta.finish_reason}
            text, entries = "", []


def _completion_choices(items: list[GenerationItem], results: list[list[Completion]], req: CompletionRequest,
                        policy: LoadedPolicy) -> tuple[list[dict], int]:
    """OpenAI's choices of a non-streamed request, and the completion tokens they hold."""
    choices, used = [], 0
    for i, (item, per_prompt) in enumerate(zip(items, results)):
        for j, c in enumerate(per_prompt):
            logprobs = None
            if req.logprobs is not None:
                entries = echoed(item.prompt, c.prompt_logprobs) if req.echo else []
                logprobs = LogprobsWriter(policy.tokenizer).render([*entries, *(c.logprobs or [])])
            choices.append({"text": (item.prompt if req.echo else "") + c.completion, "index": i * req.n + j,
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
            used += c.tokens
    return choices, used


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
