"""Request and response bodies: the only contract between the services (DESIGN.md, contracts v1).

Fields may be added; none may be renamed or removed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

ScoreKind = Literal["prob", "logit"]


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable error kind, e.g. `invalid_request`, `model_not_found`.")
    message: str = Field(description="What went wrong, for a person.")


class ErrorResponse(BaseModel):
    """Every error of every service has this body."""

    error: ErrorDetail


# -- reward service -------------------------------------------------------------------------------------------------

class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(description="Texts to score; each non-empty.", min_length=1)
    model: StrictStr | None = Field(None, description="Model name; the default model when omitted.")
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

    source: StrictStr = Field(description="Local folder or Hugging Face hub id of a sequence-classification model.")
    label: StrictStr | None = Field(
        None, description="Name of the reward label (matched exactly, else case-insensitively). Default: POSITIVE.")
    score: ScoreKind = Field("prob", description="Return the label's probability or its logit.")
    max_length: int | None = Field(None, ge=1, description="Token limit; default: the tokenizer's model_max_length.")
    revision: StrictStr | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute precision; bfloat16 uses autocast (4x faster on CPUs with AMX).")


class NamedModelSpec(ModelSpec):
    name: StrictStr = Field(description="Name clients use in `model`.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
