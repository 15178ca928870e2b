"""Other ecosystems' protocols on the reward service, each scored through the same path as /v1/score
(routes.ScoringPath: model lookup, limits, tokenizing, the model's batcher) and behind the same API key.

* OpenRLHF's remote reward model: `POST /get_reward` as `openrlhf.cli.serve_rm` serves it and
  `openrlhf.utils.agent.SingleTurnAgentExecutor` (`--reward.remote_url`, formerly `--remote_rm_url`) calls it.
* Hugging Face text-embeddings-inference (TEI) classification: `POST /predict`, and `POST /` where TEI serves a
  classifier too, which is the URL `huggingface_hub.InferenceClient(base_url).text_classification` posts to.

Both pick a served model with the query parameter `?model=NAME` (the default model without it): OpenRLHF's
reward URL and InferenceClient's base_url are bare URLs, so that is the only place a client can name one.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable
from typing import Any, Literal

import torch
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.reward.registry import ModelHandle
from services.reward.routes import _ERRORS, LabelScore, ScoringPath, _finite, ranked
from services.reward.scorer import Scorer
from services.reward.settings import RewardSettings
from shared.errors import ApiError
from shared.schemas import ScoreRequest, Text
from shared.server import bearer_guard

MODEL_QUERY = Query(None, max_length=64, description="Name of the served model to use; the default model when "
                    "omitted.")


def key_guard(get_key: Callable[[], str | None]) -> Callable[[Request], None]:
    """The service's API key (when one is set) as `Authorization: Bearer <key>`, or as HTTP Basic with the key as the
    password: OpenRLHF sends no headers of its own, but aiohttp turns the credentials of a URL
    (`http://user:KEY@host/get_reward`) into Basic auth."""
    bearer = bearer_guard(get_key)

    def guard(request: Request) -> None:
        key = get_key()
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if key and scheme.lower() == "basic":
            try:
                password = base64.b64decode(given.strip(), validate=True).decode().partition(":")[2]
            except ValueError:  # not base64, or not UTF-8
                password = ""
            if hmac.compare_digest(password.encode(), key.encode()):
                return
        bearer(request)

    return guard


def score_request(field: str, texts: list[str], prompts: list[str] | None = None, **kw: Any) -> ScoreRequest:
    """A /v1/score request for the shared path; `prompts`, each a prefix of its text, for pair and chat models."""
    for i, (text, prompt) in enumerate(zip(texts, prompts or ())):
        if not text.startswith(prompt):
            raise ApiError(422, "invalid_request", f"the prompt of {field}[{i}] is not a prefix of it: send the "
                           "prompt followed by the response")
    try:
        return ScoreRequest(texts=texts, prompts=prompts, **kw)
    except ValidationError as exc:  # raised here, not by FastAPI: still the client's input
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error.get("loc", ())) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {error.get('msg', 'invalid')}") from None


# -- OpenRLHF ---------------------------------------------------------------------------------------------------------

class RewardRequest(BaseModel):
    """What OpenRLHF 0.11 sends (`SingleTurnAgentExecutor._fetch_rewards_via_http`). Other fields are ignored, as
    serve_rm ignores them."""

    model_config = ConfigDict(extra="ignore")

    query: list[Text] = Field(min_length=1, description="Prompt + response, one per sample; each non-empty.")
    prompts: list[Text] | None = Field(
        None, description="The prompt of each query (a prefix of it): a prompt-and-response reward model scores "
        "(prompt, query minus prompt); a plain classifier scores the whole query.")
    labels: list[Any] | None = Field(
        None, description="The dataset's labels (OpenRLHF --label_key), one per query: checked for length, unused.")


class RewardResponse(BaseModel):
    rewards: list[float] = Field(description="The reward model's score of each query, in order.")
    scores: list[float] = Field(description="The same scores (OpenRLHF uses them for dynamic filtering).")
    extra_logs: dict[str, list[float]] = Field(
        description="Per-query values OpenRLHF logs: `rm_score`, the score again (serve_rm sends `dummy_scores`).")


# -- text-embeddings-inference and the Inference API ----------------------------------------------------------------

class PredictParameters(BaseModel):
    """The Inference API's text-classification parameters: what huggingface_hub.InferenceClient sends."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(None, ge=1, description="Only the top_k labels of each input.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="Scores from logits: softmax, sigmoid or none (the logits). Default: the model's own "
        "(softmax; sigmoid for a one-label or multi-label model).")


class PredictRequest(BaseModel):
    """TEI's /predict request, plus the Inference API's `parameters`."""

    model_config = ConfigDict(extra="forbid")

    inputs: Text | list[Text] | list[list[Text]] = Field(
        description="One input: a string, or a pair [text, text_pair] (or [text]). A batch: a list of those as lists, "
        "[[text], [text, text_pair], ...]. As in TEI, a list of strings is ONE input (a pair), never a batch.",
        examples=["What a great film!"])
    truncate: bool | None = Field(
        None, description="Cut inputs longer than the model's max_length (server default when omitted); false: such "
        "an input is refused with 422, as TEI does.")
    truncation_direction: Literal["right", "Right"] = Field("right", description="Only right truncation is served.")
    raw_scores: bool = Field(False, description="The logits instead of probabilities.")
    parameters: PredictParameters | None = Field(
        None, description="The Inference API's parameters (huggingface_hub.InferenceClient sends them, if only {}). "
        "When present, the answer is always a list per input, as the Inference API answers.")


def _sequences(inputs: str | list[str] | list[list[str]]) -> tuple[list[list[str]], bool]:
    """TEI's reading of `inputs`: (sequences of one or two texts, is it a batch)."""
    if isinstance(inputs, str):
        return [[inputs]], False
    if not inputs:
        raise ApiError(422, "invalid_request", "inputs is an empty list: send a string, a pair [text, text_pair] or a "
                       "batch [[text], [text, text_pair], ...]")
    if isinstance(inputs[0], str):
        if len(inputs) > 2:
            raise ApiError(422, "invalid_request", f"inputs is a list of {len(inputs)} strings: a list of strings is "
                           "one input, [text] or [text, text_pair]; send a batch as a list of lists, [[a], [b], ...]")
        return [inputs], False
    for i, sequence in enumerate(inputs):
        if len(sequence) not in (1, 2):
            raise ApiError(422, "invalid_request", f"inputs[{i}] has {len(sequence)} strings: each input of a batch "
                           "is [text] or [text, text_pair]")
    return inputs, True


def _scores(scorer: Scorer, logits: list[list[float]], function: str | None) -> list[list[float]]:
    """Every label's score: the logits (`none`), softmax, sigmoid, or by default the model's probabilities (softmax;
    sigmoid for a one-label or multi-label model, as TEI and the transformers pipeline do)."""
    if function == "none":
        return logits
    if function is None:
        return scorer.probabilities(logits).tolist()
    x = torch.tensor(logits, dtype=torch.float32)
    return (x.softmax(-1) if function == "softmax" else x.sigmoid()).tolist()


def _check_inputs(sequences: list[list[str]], batch: bool, served: ModelHandle) -> int:
    """No empty text, and pairs only for a model that scores pairs (and only pairs for it); how many are pairs."""
    for i, sequence in enumerate(sequences):
        for j, text in enumerate(sequence):
            if not text:
                where = f"inputs[{i}][{j}]" if batch else "inputs" if len(sequence) == 1 else f"inputs[{j}]"
                raise ApiError(400, "invalid_request", f"{where} is empty")
    pairs = sum(len(s) == 2 for s in sequences)
    if pairs and served.scorer.input_kind == "text":
        raise ApiError(422, "invalid_request", f"model {served.name!r} takes one text per input (input: text), "
                       "not [text, text_pair]; a model loaded with input: pair scores text pairs")
    if pairs < len(sequences) and served.scorer.input_kind != "text":
        raise ApiError(422, "invalid_request", f"model {served.name!r} scores text pairs (input: "
                       f"{served.scorer.input_kind}): send every input as [text, text_pair]")
    return pairs


def _score_function(req: PredictRequest, params: PredictParameters) -> str | None:
    """`function_to_apply`, with `raw_scores` read as `none` (the two must not contradict each other)."""
    function = params.function_to_apply
    if req.raw_scores:
        if function not in (None, "none"):
            raise ApiError(422, "invalid_request", f"raw_scores and function_to_apply={function!r} contradict "
                           "each other: send one of them")
        function = "none"
    return function


def build_compat_router(settings: RewardSettings, scoring: ScoringPath) -> APIRouter:
    router = APIRouter(responses=_ERRORS, dependencies=[Depends(key_guard(lambda: settings.api_key))])

    @router.post("/get_reward", response_model=RewardResponse, tags=["OpenRLHF"])
    async def get_reward(req: RewardRequest, response: Response, model: str | None = MODEL_QUERY) -> RewardResponse:
        """OpenRLHF's remote reward model (`--remote_rm_url http://host:8000/get_reward`): the reward of each query.
        With an API key: `http://rlhf:KEY@host:8000/get_reward` (Basic auth), or `Authorization: Bearer KEY`."""
        n = len(req.query)
        for name, values in (("prompts", req.prompts), ("labels", req.labels)):
            if values is not None and len(values) != n:
                raise ApiError(422, "invalid_request", f"{name} has {len(values)} entries and query {n}: send one "
                               "per query")
        # A single-text model scores the whole query, as serve_rm does, whatever the prompts (OpenRLHF decodes the
        # query from tokens, so its prompt need not be an exact prefix); a pair or chat model needs them as prefixes.
        prompts = None if scoring.lookup(model).scorer.input_kind == "text" else req.prompts
        handle, logits = await scoring.run(score_request("query", req.query, prompts, model=model), response,
                                           field="query")
        scores = handle.scorer.scores(logits)
        _finite(scores, handle.name)
        return RewardResponse(rewards=scores, scores=scores, extra_logs={"rm_score": scores})

    async def predict(req: PredictRequest, response: Response, model: str | None = MODEL_QUERY):
        """text-embeddings-inference's /predict: every label of each input as `{label, score}`, highest first; one
        input -> a list, a batch -> a list of lists. Text pairs reach pair models as (text, text_pair). With the
        Inference API's `parameters` (huggingface_hub.InferenceClient): top_k, function_to_apply, and always a
        list per input."""
        sequences, batch = _sequences(req.inputs)
        pairs = _check_inputs(sequences, batch, scoring.lookup(model))
        params = req.parameters or PredictParameters()
        function = _score_function(req, params)
        texts = ["".join(s) for s in sequences]
        prompts = [s[0] for s in sequences] if pairs else None
        handle, logits = await scoring.run(score_request("inputs", texts, prompts, model=model, truncate=req.truncate),
                                           response, field="inputs", too_long=(422, "invalid_request"))
        names = [handle.scorer.id2label[i] for i in range(len(handle.scorer.id2label))]
        rows = _scores(handle.scorer, logits, function)
        _finite([v for row in rows for v in row], handle.name)
        answer = [ranked(names, row, params.top_k) for row in rows]
        return answer if batch or req.parameters is not None else answer[0]

    for path in ("/predict", "/"):  # TEI serves a classifier's /predict on / too: InferenceClient(base_url) posts there
        router.add_api_route(path, predict, methods=["POST"], response_model=list[LabelScore] | list[list[LabelScore]],
                             tags=["TEI"], operation_id="predict" if path == "/predict" else "predict_root")
    return router
