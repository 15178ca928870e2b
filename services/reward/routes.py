"""HTTP routes of the reward service. The only place that maps failures to status codes."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Response

from services.reward.registry import DefaultModelError, ModelHandle, ModelRegistry, UnknownModelError
from services.reward.scorer import TextTooLongError, resolve_label
from services.reward.settings import RewardSettings
from shared.batching import BatcherClosedError, BatchTimeoutError, QueueFullError, Timing
from shared.modeling import ModelLoadError
from shared.schemas import ClassifyResponse, ErrorResponse, ModelInfo, ModelList, ModelSpec, ScoreRequest, ScoreResponse
from shared.server import ApiError, bearer_guard

log = logging.getLogger(__name__)

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 500, 503)}
# Tokenizing this much text takes well under a millisecond: cheaper on the loop than a hop to a thread.
INLINE_TOKENIZE_CHARS = 4096
MODEL_NAME = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Model name.")


class PutModel(ModelSpec):
    default: bool = False


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def build_router(settings: RewardSettings, registry: ModelRegistry) -> APIRouter:
    user = Depends(bearer_guard(lambda: settings.api_key))
    admin = Depends(bearer_guard(lambda: settings.admin_key))
    router = APIRouter(prefix="/v1", responses=_ERRORS)

    # A request larger than the queue could never be admitted: say so (413) rather than "retry later" (429).
    max_texts = min(settings.max_texts_per_request, settings.batching.max_queue_size)

    def validate(req: ScoreRequest) -> None:
        if len(req.texts) > max_texts:
            raise ApiError(413, "payload_too_large", f"{len(req.texts)} texts in one request; the limit is "
                           f"{max_texts}: split the list into chunks")
        for i, text in enumerate(req.texts):
            if not text:
                raise ApiError(422, "invalid_request", f"texts[{i}] is empty")
            if len(text) > settings.max_text_chars:
                raise ApiError(413, "payload_too_large",
                               f"texts[{i}] has {len(text)} characters; the limit is {settings.max_text_chars}")

    async def run(req: ScoreRequest, response: Response) -> tuple[ModelHandle, list[list[float]]]:
        """Validate, tokenize (off the loop when large), wait for the batcher; retry once if the model was swapped."""
        validate(req)
        truncate = settings.truncate if req.truncate is None else req.truncate
        for attempt in range(2):
            try:
                handle = registry.get(req.model)
            except UnknownModelError as exc:
                raise ApiError(404, "model_not_found", exc.message) from None
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                if sum(map(len, req.texts)) <= INLINE_TOKENIZE_CHARS:
                    ids = handle.scorer.tokenize(req.texts, truncate)
                else:
                    ids = await asyncio.to_thread(handle.scorer.tokenize, req.texts, truncate)
            except TextTooLongError as exc:
                raise ApiError(413, "payload_too_large", str(exc)) from None
            tokenized = loop.time() - started
            try:
                logits, timing = await handle.batcher.submit(ids, timeout=settings.batching.request_timeout_s)
            except BatcherClosedError:
                if attempt == 0:
                    continue
                raise ApiError(503, "unavailable", f"model {handle.name!r} is being replaced; retry",
                               {"Retry-After": "1"}) from None
            except QueueFullError as exc:
                raise ApiError(429, "overloaded", str(exc), {"Retry-After": "1"}) from None
            except BatchTimeoutError as exc:
                raise ApiError(503, "timeout", str(exc), {"Retry-After": "1"}) from None
            except Exception as exc:  # the forward pass failed: a server fault, never the client's input
                log.exception("inference failed on model %s", handle.name)
                raise ApiError(500, "inference_error", f"inference failed: {type(exc).__name__}: {exc}") from None
            _timing_headers(response, handle.name, tokenized, timing)
            return handle, logits
        raise AssertionError("unreachable")

    @router.post("/score", response_model=ScoreResponse, dependencies=[user])
    async def score(req: ScoreRequest, response: Response) -> ScoreResponse:
        """The reward: one score per text, in order, for the model's reward label."""
        handle, logits = await run(req, response)
        label_index = None
        if req.label is not None:
            try:
                label_index = resolve_label(handle.scorer.id2label, req.label)
            except ModelLoadError as exc:
                raise ApiError(422, "invalid_request", str(exc)) from None
        scores = handle.scorer.scores(logits, label_index)
        assert len(scores) == len(req.texts)
        label = handle.scorer.label if label_index is None else handle.scorer.id2label[label_index]
        return ScoreResponse(model=handle.name, label=label, score_kind=handle.scorer.spec.score, scores=scores)

    @router.post("/classify", response_model=ClassifyResponse, dependencies=[user])
    async def classify(req: ScoreRequest, response: Response) -> ClassifyResponse:
        """Every label's probability for every text."""
        handle, logits = await run(req, response)
        names = [handle.scorer.id2label[i] for i in range(len(handle.scorer.id2label))]
        probs = handle.scorer.probabilities(logits).tolist()
        return ClassifyResponse(model=handle.name, labels=names,
                                probabilities=[dict(zip(names, row)) for row in probs])

    @router.get("/models", response_model=ModelList, dependencies=[user])
    async def models() -> ModelList:
        return ModelList(models=registry.infos())

    @router.put("/models/{name}", response_model=ModelInfo, dependencies=[admin])
    async def put_model(response: Response, spec: Annotated[PutModel, Body()], name: str = MODEL_NAME) -> ModelInfo:
        """Load a model, or replace one: the old one keeps serving if the new one fails to load."""
        try:
            _, replaced = await registry.put(name, ModelSpec(**spec.model_dump(exclude={"default"})), spec.default)
        except ModelLoadError as exc:
            raise ApiError(422, "model_load_failed", str(exc)) from None
        response.status_code = 200 if replaced else 201
        return next(info for info in registry.infos() if info.name == name)

    @router.delete("/models/{name}", status_code=204, dependencies=[admin])
    async def delete_model(name: str = MODEL_NAME) -> Response:
        try:
            await registry.remove(name)
        except UnknownModelError as exc:
            raise ApiError(404, "model_not_found", exc.message) from None
        except DefaultModelError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return Response(status_code=204)

    return router


def _timing_headers(response: Response, model: str, tokenized: float, timing: Timing) -> None:
    response.headers["x-model"] = model
    response.headers["x-tokenization-time"] = _ms(tokenized)
    response.headers["x-queue-time"] = _ms(timing.queue)
    response.headers["x-inference-time"] = _ms(timing.compute)
