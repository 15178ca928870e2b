"""Request and response bodies: the only contract between the services (contracts v1).

Fields may be added; none may be renamed or removed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

ScoreKind = Literal["prob", "logit"]


def _utf8(text: str) -> str:
    """JSON can carry a lone surrogate (`"\\ud800"`), which no tokenizer can encode: refuse it as bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate at position {exc.start}: not valid Unicode text") from None
    return text


# Every string a client sends: a real str (no coercion) that is valid Unicode.
Text = Annotated[StrictStr, AfterValidator(_utf8)]


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable error kind, e.g. `invalid_request`, `model_not_found`.")
    message: str = Field(description="What went wrong, for a person.")
    request_id: str | None = Field(None, description="The request's id (also the `x-request-id` header); server "
                                   "logs name it.")


class ErrorResponse(BaseModel):
    """Every error of every service has this body."""

    error: ErrorDetail


# -- reward service -------------------------------------------------------------------------------------------------

class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(description="Texts to score; each non-empty.", min_length=1)
    model: Text | None = Field(None, description="Model name; the default model when omitted.")
    label: Text | None = Field(
        None, description="Score this label (by name) instead of the model's reward label, e.g. NEGATIVE.")
    truncate: bool | None = Field(
        None, description="Cut texts longer than the model's max_length (server default when omitted); when false "
        "such a text is rejected with 413.")


class ScoreResponse(BaseModel):
    model: str = Field(description="The model that scored the texts.")
    label: str = Field(description="The reward label whose score is returned.")
    score_kind: ScoreKind = Field(description="`prob`: the label's probability; `logit`: its raw logit.")
    scores: list[float] = Field(description="One score per text, in request order.")


class ClassifyResponse(BaseModel):
    model: str
    labels: list[str] = Field(description="Label names in the model's order (id2label).")
    probabilities: list[dict[str, float]] = Field(description="For each text, every label's probability.")


class ModelSpec(BaseModel):
    """How to load one reward model. The reward label is chosen by NAME, never by index."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: Text = Field(description="Local folder or Hugging Face hub id of a sequence-classification model.")
    label: Text | None = Field(
        None, description="Name of the reward label (matched exactly, else case-insensitively). Default: POSITIVE.")
    score: ScoreKind = Field("prob", description="Return the label's probability or its logit.")
    max_length: int | None = Field(None, ge=1, description="Token limit; default: the tokenizer's model_max_length.")
    revision: Text | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute precision; bfloat16 uses autocast (4x faster on CPUs with AMX).")


class NamedModelSpec(ModelSpec):
    name: Text = Field(description="Name clients use in `model`.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelInfo(BaseModel):
    name: str
    source: str
    labels: dict[int, str] = Field(description="id2label of the model.")
    reward_label: str
    score_kind: ScoreKind
    max_length: int
    dtype: str
    device: str
    default: bool


class ModelList(BaseModel):
    models: list[ModelInfo]


# -- generator service ----------------------------------------------------------------------------------------------

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
CheckpointName = Annotated[Text, Field(max_length=256)]


def _bounded_stops(stop: str | list[str] | None) -> str | list[str] | None:
    """Stop strings are searched in every completion: their number and length are bounded."""
    many = [stop] if isinstance(stop, str) else stop or []
    if len(many) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in many):
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, each at most {MAX_STOP_CHARS} characters")
    return stop


StopList = Annotated[list[Text], AfterValidator(_bounded_stops)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[Text] = Field(min_length=1, description="Prompts to continue.")
    checkpoint: CheckpointName = Field("latest", description="`base`, `latest` (newest complete) or "
                                       "`<run>/step-<N>`.")
    max_new_tokens: int = Field(40, ge=1, description="Most tokens to add per completion.")
    do_sample: bool = Field(True, description="Sample (true) or greedy decode (false).")
    temperature: float = Field(1.0, gt=0, le=100, description="Softmax temperature when sampling (below 1e-5: "
                               "greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0: off).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed and parameters: the same text.")
    num_return_sequences: int = Field(1, ge=1, description="Completions per prompt.")
    stop: StopList = Field(default_factory=list, description="Cut at the first of these (at most 8, each at most "
                           "256 characters).")


class GeneratedText(BaseModel):
    prompt: str
    completion: str
    text: str = Field(description="prompt + completion")
    finish_reason: Literal["stop", "length"]
    tokens: int = Field(description="Completion tokens.")
    index: int = Field(description="Which prompt this continues.")


class GenerateResponse(BaseModel):
    checkpoint: str = Field(description="The checkpoint actually used (`latest` resolved to its name).")
    step: int | None
    completions: list[GeneratedText] = Field(description="num_return_sequences per prompt, prompt by prompt.")


class CheckpointEntry(BaseModel):
    name: str
    run: str | None
    step: int | None
    time: float | None
    metrics: dict
    valid: bool
    error: str | None
    loaded: bool
    latest: bool


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointEntry]


class CompletionRequest(BaseModel):
    """OpenAI `/v1/completions`; `model` is the checkpoint name."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: CheckpointName = "latest"
    prompt: Text | list[Text] = ""
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description="0 (or below 1e-5): greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Annotated[Text | list[Text] | None, AfterValidator(_bounded_stops)] = None
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
