"""Reward service settings: environment (`REWARD_*`), a YAML file, or CLI flags, validated at start."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.schemas import Backend, Dtype, NamedModelSpec, ScoreKind
from shared.settings import ServiceSettings


class BatchingSettings(BaseModel):
    max_batch_size: int = Field(32, ge=1, description="Most texts in one forward pass (1 turns batching off).")
    max_batch_tokens: int = Field(16384, ge=1, description="Most padded tokens (texts x longest) in one pass.")
    max_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits for more texts once it has one.")
    max_queue_size: int = Field(4096, ge=1, description="Most texts waiting per model; more -> 429 Retry-After.")
    request_timeout_s: float = Field(30.0, gt=0, description="A request not served by then gets 503 Retry-After.")


class RewardSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="REWARD_")

    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind.")
    models: list[NamedModelSpec] = Field(
        default_factory=list, description="Models to load at start; the first is the default.")
    model: str | None = Field(None, description="Shorthand for one model: its source (folder or hub id).")
    label: str | None = Field(None, description="Shorthand: the reward label of `model` (default POSITIVE).")
    name: str = Field("default", description="Shorthand: the name of `model`.")
    score: ScoreKind | None = Field(
        None, description="Shorthand: `prob` or `logit` for `model` (default: prob, logit for a scalar-head model).")
    backend: Backend | None = Field(None, description="Shorthand: the backend of `model` (torch, onnx, auto).")
    dtype: Dtype | None = Field(None, description="Shorthand: the dtype of `model` (float32, bfloat16, float16, "
                                "int8; which the backend takes).")
    batching: BatchingSettings = Field(default_factory=BatchingSettings, description="Dynamic batching.")
    admin_api_key: str | None = Field(
        None, description="Key for PUT/DELETE /v1/models. Model control is OFF (403) unless it is set; it must "
        "differ from api_key, so a scoring key never grants admin.")
    model_dirs: list[Path] = Field(
        default_factory=list, description="Folders whose models PUT /v1/models may load (besides the folders of "
        "the startup models).")
    allow_hub_models: bool = Field(False, description="Let PUT /v1/models load hub ids (off: local folders only).")
    max_models: int = Field(4, ge=1, description="Most models loaded at once; loading one more -> 409.")
    max_texts_per_request: int = Field(1024, ge=1, description="More texts in one request -> 413.")
    max_text_chars: int = Field(100_000, ge=1, description="A longer text -> 413 (before tokenizing it).")
    truncate: bool = Field(True, description="Cut texts longer than max_length (else 413), unless a request says.")

    @model_validator(mode="after")
    def _one_model_at_least(self) -> RewardSettings:
        if self.model:
            chosen = {k: v for k, v in {"backend": self.backend, "dtype": self.dtype}.items() if v is not None}
            self.models = [NamedModelSpec(name=self.name, source=self.model, label=self.label, score=self.score,
                                          **chosen),
                           *[m for m in self.models if m.name != self.name]]
        elif self.backend is not None or self.dtype is not None:
            raise ValueError("backend and dtype here apply to `model`; set them per model in `models` instead")
        if not self.models:
            raise ValueError("no reward model configured: pass --model SOURCE, --config FILE or set REWARD_MODEL")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if len(names) > self.max_models:
            raise ValueError(f"{len(names)} startup models but max_models is {self.max_models}")
        if self.admin_api_key and self.admin_api_key == self.api_key:
            raise ValueError("admin_api_key must differ from api_key: a scoring key must never grant admin")
        return self
