"""Request and response bodies: the only contract between the services (contracts v1).

Fields may be added; none may be renamed or removed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

ScoreKind = Literal["prob", "logit"]
# How a reward model takes its input: the text alone, (prompt, response) as a tokenizer text pair, or the
# tokenizer's chat template with user = prompt and assistant = response; `auto`: chat when the tokenizer has a
# chat template, else text.
InputKind = Literal["text", "pair", "chat"]
# What runs a reward model and at which precision; which dtypes each backend takes (float16: GPU only, checked at
# load). `auto` takes float32 only, the default: it picks the dtype itself.
Backend = Literal["torch", "onnx", "auto"]
Dtype = Literal["float32", "bfloat16", "float16", "int8"]
BACKEND_DTYPES: dict[str, tuple[str, ...]] = {"torch": ("float32", "bfloat16", "float16"),
                                              "onnx": ("float32", "int8"), "auto": ("float32",)}
# Normalization bounds: (score - mean) / std stays finite for any score a model can produce.
MAX_REWARD_MEAN, MIN_REWARD_STD, MAX_REWARD_STD = 1e12, 1e-12, 1e12


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
    prompts: list[Text] | None = Field(
        None, description="The prompt of each text, for prompt-and-response reward models: as many as texts, each a "
        "prefix of its text (texts stay the whole prompt + response). A pair or chat model scores (prompt, "
        "text[len(prompt):]); a single-text model ignores prompts.")

    @model_validator(mode="after")
    def _prompts_are_prefixes(self) -> ScoreRequest:
        if self.prompts is None:
            return self
        if len(self.prompts) != len(self.texts):
            raise ValueError(f"prompts has {len(self.prompts)} entries but texts has {len(self.texts)}: send one "
                             "prompt per text")
        bad = [i for i, (p, t) in enumerate(zip(self.prompts, self.texts)) if not t.startswith(p)]
        if bad:
            raise ValueError(f"prompts[{bad[0]}] is not a prefix of texts[{bad[0]}]"
                             + (f" (nor are {len(bad) - 1} more)" if len(bad) > 1 else "")
                             + ": each text must be its prompt followed by the response")
        return self


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
    score: ScoreKind | None = Field(
        None, description="Return the label's probability (`prob`) or its raw logit (`logit`). Default: prob, but "
        "logit for a scalar-head reward model (num_labels 1), whose raw value is the reward (prob is refused there), "
        "and for a model with `normalize`.")
    max_length: int | None = Field(None, ge=1, description="Token limit; default: the tokenizer's model_max_length.")
    revision: Text | None = Field(None, description="Hub revision (branch, tag or commit).")
    backend: Backend = Field(
        "torch", description="What runs the model: `torch`, `onnx` (exported once with torch.onnx, cached beside the "
        "model, run by onnxruntime) or `auto` (a short calibration at load times each backend and dtype this machine "
        "can run and keeps the fastest whose scores match float32 torch within its tolerance).")
    dtype: Dtype = Field(
        "float32", description="Compute precision. torch: float32, bfloat16 (autocast; fast on CPUs with AVX-512 BF16 "
        "or AMX), float16 (GPU only). onnx: float32 or int8 (dynamic quantization). auto: leave it out (it is "
        "chosen).")
    input: InputKind | Literal["auto"] = Field(
        "text", description="How the model takes its input: `text` (the whole text), `pair` ((prompt, response) as "
        "a tokenizer text pair), `chat` (the tokenizer's chat template, user = prompt, assistant = response) or "
        "`auto` (chat when the tokenizer has a chat template, else text). pair and chat need `prompts` in requests.")
    normalize: bool = Field(
        False, description="Return (score - mean) / std, as OpenRLHF's --normalize_reward: mean and std from "
        "reward_mean / reward_std, else from the model's config.json (`mean`, `std`). Needs raw scores (logit).")
    reward_mean: float | None = Field(None, ge=-MAX_REWARD_MEAN, le=MAX_REWARD_MEAN, description="Mean for "
                                      "`normalize`.")
    reward_std: float | None = Field(None, ge=MIN_REWARD_STD, le=MAX_REWARD_STD, description="Std for `normalize`.")

    @model_validator(mode="after")
    def _backend_takes_dtype(self) -> ModelSpec:
        allowed = BACKEND_DTYPES[self.backend]
        if self.dtype not in allowed:
            raise ValueError(f"backend {self.backend} does not take dtype {self.dtype}: it takes "
                             f"{' or '.join(allowed)}" + (" (auto chooses the dtype itself)" if self.backend == "auto"
                                                          else ""))
        return self

    @model_validator(mode="after")
    def _normalization_is_consistent(self) -> ModelSpec:
        if not self.normalize and (self.reward_mean is not None or self.reward_std is not None):
            raise ValueError("reward_mean / reward_std apply only with normalize: true")
        if self.normalize and self.score == "prob":
            raise ValueError("normalize applies to raw scores: use score: logit (or leave score out)")
        return self


class NamedModelSpec(ModelSpec):
    name: Text = Field(description="Name clients use in `model`.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelInfo(BaseModel):
    name: str
    source: str
    labels: dict[int, str] = Field(description="id2label of the model.")
    reward_label: str
    score_kind: ScoreKind
    max_length: int
    dtype: str = Field(description="The precision it runs at (with backend auto: the one chosen).")
    device: str
    default: bool
    backend: Literal["torch", "onnx"] = Field("torch", description="What runs it (with backend auto: the one "
                                              "chosen).")
    backend_requested: Backend = Field("torch", description="The spec's backend: `auto` when it was chosen at load.")
    input: InputKind = Field("text", description="How the model takes its input (`auto` resolved).")
    reward_mean: float | None = Field(None, description="Normalization mean; null when scores are not normalized.")
    reward_std: float | None = Field(None, description="Normalization std; null when scores are not normalized.")


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="End the stream with a chunk carrying `usage` (and no choices).")


class CompletionRequest(BaseModel):
    """OpenAI `/v1/completions`; `model` is the checkpoint name. A null field means its default, as in OpenAI. Fields
    not declared here are refused (400), never ignored; `top_k`, `min_p`, `repetition_penalty` and `min_tokens` are
    vLLM's extensions."""

    # Extras are kept so that the route can name them in its 400; the schema says they are refused.
    model_config = ConfigDict(extra="allow", protected_namespaces=(),
                              json_schema_extra={"additionalProperties": False})

    model: CheckpointName = "latest"
    prompt: Text | list[Text] = Field("", description="Text or a list of texts (token-id prompts are refused).")
    suffix: Text | None = Field(None, description="Refused unless empty: the policy cannot fill in text.")
    max_tokens: int = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 (or below 1e-5): greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Annotated[Text | list[Text] | None, AfterValidator(_bounded_stops)] = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, strict=True, description="Log-probabilities of each token and "
                                 "of this many most likely ones, under the model's own distribution.")
    best_of: int | None = Field(None, ge=1, description="Only 1 or n: candidates are not reranked.")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | \
        None = Field(None, max_length=300, description="Token id -> bias added to its logit.")
    user: Text | None = Field(None, max_length=256, description="Accepted; changes nothing.")
    top_k: int = Field(0, ge=-1, le=2**31 - 1, description="vLLM: keep the k most likely tokens (0 or -1: off).")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM: drop tokens below min_p x the top probability.")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, description="vLLM: penalize tokens of the prompt and "
                                      "output so far (1: off).")
    min_tokens: int = Field(0, ge=0, description="vLLM: no EOS or stop string before this many tokens.")

    @model_validator(mode="before")
    @classmethod
    def _openai_input(cls, data):
        if not isinstance(data, dict):
            return data
        prompt = data.get("prompt")
        if isinstance(prompt, list) and any(isinstance(p, (int, list)) and not isinstance(p, bool) for p in prompt):
            raise ValueError("prompt: token-id prompts are not supported; send the prompt as text")
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}


class OpenAIModel(BaseModel):
    id: str = Field(description="A name `model` accepts: `base`, `latest` or `<run>/step-<N>`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time: the checkpoint's manifest time (base: when the server started).")
    owned_by: str


class OpenAIModelList(BaseModel):
    """OpenAI `GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]
