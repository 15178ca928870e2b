"""HTTP routes of the reward service. The only place that maps failures to status codes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Response, params
from pydantic import BaseModel, Field

from services.reward.registry import DefaultModelError, ModelCapError, ModelHandle, ModelRegistry, UnknownModelError
from services.reward.scorer import PromptsRequiredError, TextTooLongError, resolve_label
from services.reward.settings import RewardSettings
from services.reward.sources import SourcePolicy, SourceRefusedError
from shared.batching import BatcherClosedError, Timing
from shared.errors import ApiError, UnavailableError
from shared.modeling import ModelLoadError
from shared.schemas import ClassifyResponse, ErrorResponse, ModelInfo, ModelList, ModelSpec, ScoreRequest, ScoreResponse
from shared.scores import non_finite_positions
from shared.server import batcher_errors, bearer_guard, server_fault

log = logging.getLogger(__name__)

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 503)}
ADMIN_OFF = ("model control is off: start the service with an admin key (REWARD_ADMIN_API_KEY, or admin_api_key "
             "in the config) to enable PUT and DELETE /v1/models")
# Tokenizing this much text takes well under a millisecond: cheaper on the loop than a hop to a thread.
INLINE_TOKENIZE_CHARS = 4096
MODEL_NAME = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Model name.")


class PutModel(ModelSpec):
    default: bool = False


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyRequest(ScoreRequest):
    top_k: int | None = Field(
        None, ge=1, description="Answer in the shape of transformers' pipeline(\"text-classification\", top_k=...): "
        "for each text a list of {label, score}, highest score first, at most top_k labels (a top_k of at least the "
        "number of labels returns them all). Omitted: the `labels` + `probabilities` answer.")


def ranked(names: list[str], row: list[float], top_k: int | None = None) -> list[dict]:
    """One text's labels as `{label, score}`, highest score first (ties in the model's label order), at most top_k:
    the shape of transformers' text-classification pipeline and of text-embeddings-inference's /predict."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    return [{"label": names[i], "score": row[i]} for i in order[:top_k]]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _admin_enabled(settings: RewardSettings) -> Callable[[], None]:
    def check() -> None:
        if not settings.admin_api_key:
            raise ApiError(403, "forbidden", ADMIN_OFF)

    return check


def _finite(values: list[float], model: str) -> None:
    """A NaN or inf from the model is a server fault: never hand it to a client as a score (JSON would say null)."""
    if bad := non_finite_positions(values):
        raise server_fault("non_finite_output", f"model {model!r} produced non-finite output for texts {bad[:10]}; "
                           "its weights or dtype are broken")


class ScoringPath:
    """The one way a request's texts get scored, shared by the /v1 routes and the protocol routes (compat.py): the
    model lookup, the request limits, tokenizing (off the loop when large) and the model's batcher.

    `loading()` says which startup models are still loading, None once the load has ended."""

    def __init__(self, settings: RewardSettings, registry: ModelRegistry, loading: Callable[[], str | None]):
        self.settings, self.registry, self.loading = settings, registry, loading
        # A request larger than the queue could never be admitted: say so (413) rather than "retry later" (429).
        self.max_texts = min(settings.max_texts_per_request, settings.batching.max_queue_size)

    def lookup(self, name: str | None) -> ModelHandle:
        """The model to serve; 503 (retry) while the startup models load or when none is loaded, 404 for a name
        that is not loaded."""
        try:
            return self.registry.get(name)
        except UnknownModelError as exc:
            if (why := self.loading()) or not len(self.registry):  # a model load takes seconds: retry in 2
                raise UnavailableError(f"{why or 'no model is loaded'}; retry", retry_after=2) from None
            raise ApiError(404, "model_not_found", exc.message) from None

    def validate(self, req: ScoreRequest, field: str = "texts") -> None:
        """The request limits; `field` names the client's list in the messages (`query` for OpenRLHF, ...)."""
        if len(req.texts) > self.max_texts:
            raise ApiError(413, "payload_too_large", f"{len(req.texts)} texts in one request; the limit is "
                           f"{self.max_texts}: split the list into chunks")
        for i, text in enumerate(req.texts):
            if not text:
                raise ApiError(422, "invalid_request", f"{field}[{i}] is empty")
            if len(text) > self.settings.max_text_chars:
                raise ApiError(413, "payload_too_large", f"{field}[{i}] has {len(text)} characters; the limit is "
                               f"{self.settings.max_text_chars}")

    async def run(self, req: ScoreRequest, response: Response, *, field: str = "texts",
                  too_long: tuple[int, str] = (413, "payload_too_large")) -> tuple[ModelHandle, list[list[float]]]:
        """Validate, tokenize (off the loop when large), wait for the batcher; retry once if the model was swapped.
        A text over max_length without truncation is refused with `too_long` (status, type)."""
        settings = self.settings
        self.validate(req, field)
        truncate = settings.truncate if req.truncate is None else req.truncate
        for attempt in range(2):
            handle = self.lookup(req.model)
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                if sum(map(len, req.texts)) <= INLINE_TOKENIZE_CHARS:
                    ids = handle.scorer.tokenize(req.texts, truncate, req.prompts)
                else:
                    ids = await asyncio.to_thread(handle.scorer.tokenize, req.texts, truncate, req.prompts)
            except TextTooLongError as exc:
                raise ApiError(*too_long, str(exc).replace("texts[", f"{field}[", 1)) from None
            except PromptsRequiredError as exc:  # a pair or chat model was sent no prompts
                raise ApiError(422, "invalid_request", f"model {handle.name!r}: {exc}") from None
            tokenized = loop.time() - started
            with batcher_errors():
                try:
                    logits, timing = await handle.batcher.submit(ids, timeout=settings.batching.request_timeout_s)
                except BatcherClosedError:
                    if attempt == 0:  # the model was swapped mid-request: once more, on its replacement
                        continue
                    raise
            _timing_headers(response, handle.name, tokenized, timing)
            return handle, logits
        raise AssertionError("unreachable")


def build_router(settings: RewardSettings, registry: ModelRegistry, loading: Callable[[], str | None]) -> APIRouter:
    """`loading()` says which startup models are still loading, None once the load has ended."""
    router = APIRouter(prefix="/v1", responses=_ERRORS)
    _add_scoring_routes(router, ScoringPath(settings, registry, loading))
    _add_model_routes(router, settings, registry)
    return router


def _user(settings: RewardSettings) -> params.Depends:
    return Depends(bearer_guard(lambda: settings.api_key))


def _add_scoring_routes(router: APIRouter, scoring: ScoringPath) -> None:
    user = _user(scoring.settings)

    @router.post("/score", response_model=ScoreResponse, dependencies=[user])
    async def score(req: ScoreRequest, response: Response) -> ScoreResponse:
        """The reward: one score per text, in order, for the model's reward label."""
        handle, logits = await scoring.run(req, response)
        label_index = None
        if req.label is not None:
            try:
                label_index = resolve_label(handle.scorer.id2label, req.label)
            except ModelLoadError as exc:
                raise ApiError(422, "invalid_request", str(exc)) from None
        scores = handle.scorer.scores(logits, label_index)
        _finite(scores, handle.name)
        label = handle.scorer.label if label_index is None else handle.scorer.id2label[label_index]
        return ScoreResponse(model=handle.name, label=label, score_kind=handle.scorer.spec.score, scores=scores)

    @router.post("/classify", response_model=ClassifyResponse | list[list[LabelScore]], dependencies=[user])
    async def classify(req: ClassifyRequest, response: Response) -> ClassifyResponse | list[list[dict]]:
        """Every label's probability for every text. With `top_k`: transformers' text-classification pipeline shape
        instead, for each text its top_k labels as `{label, score}`, highest first."""
        handle, logits = await scoring.run(req, response)
        names = [handle.scorer.id2label[i] for i in range(len(handle.scorer.id2label))]
        probs = handle.scorer.probabilities(logits).tolist()
        _finite([p for row in probs for p in row], handle.name)
        if req.top_k is not None:
            return [ranked(names, row, req.top_k) for row in probs]
        return ClassifyResponse(model=handle.name, labels=names,
                                probabilities=[dict(zip(names, row)) for row in probs])


def _add_model_routes(router: APIRouter, settings: RewardSettings, registry: ModelRegistry) -> None:
    """The model list (users) and model control (admins)."""
    user = _user(settings)
    admin = [Depends(_admin_enabled(settings)), Depends(bearer_guard(lambda: settings.admin_api_key))]
    sources = SourcePolicy(settings.model_dirs, [m.source for m in settings.models], settings.allow_hub_models)

    @router.get("/models", response_model=ModelList, dependencies=[user])
    async def models() -> ModelList:
        return ModelList(models=registry.infos())

    @router.put("/models/{name}", response_model=ModelInfo, dependencies=admin)
    async def put_model(response: Response, spec: Annotated[PutModel, Body()], name: str = MODEL_NAME) -> ModelInfo:
        """Load a model, or replace one: the old one keeps serving if the new one fails to load. Sources: the
        startup models, folders under `model_dirs`, hub ids when `allow_hub_models` is on; at most `max_models`."""
        try:
            source = sources.check(spec.source)
            model = ModelSpec(**spec.model_dump(exclude={"default"}) | {"source": source})
            _, replaced = await registry.put(name, model, spec.default)
        except SourceRefusedError as exc:
            raise ApiError(403, "forbidden", str(exc)) from None
        except ModelCapError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        except ModelLoadError as exc:
            raise ApiError(422, "model_load_failed", str(exc)) from None
        response.status_code = 200 if replaced else 201
        return next(info for info in registry.infos() if info.name == name)

    @router.delete("/models/{name}", status_code=204, dependencies=admin)
    async def delete_model(name: str = MODEL_NAME) -> Response:
        try:
            await registry.remove(name)
        except UnknownModelError as exc:
            raise ApiError(404, "model_not_found", exc.message) from None
        except DefaultModelError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return Response(status_code=204)


def _timing_headers(response: Response, model: str, tokenized: float, timing: Timing) -> None:
    response.headers["x-model"] = model
    response.headers["x-tokenization-time"] = _ms(tokenized)
    response.headers["x-queue-time"] = _ms(timing.queue)
    response.headers["x-inference-time"] = _ms(timing.compute)
