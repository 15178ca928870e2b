"""Generator service settings: environment (`GENERATOR_*`), a YAML file, or CLI flags, validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class GeneratorBatching(BaseModel):
    mode: Literal["continuous", "static"] = Field("continuous", description="continuous: requests join and leave "
                                                  "the running batch between tokens; static: one generate call per "
                                                  "batch of compatible requests.")
    max_batch_size: int = Field(16, ge=1, description="Most sequences decoding together (1 turns batching off).")
    max_batch_tokens: int = Field(65536, ge=1, description="Most padded (prompt + new) tokens in one batch.")
    max_wait_ms: float = Field(50.0, ge=0, description="static: longest wait for compatible requests (cut short "
                               "once as many are waiting as in recent batches).")
    join_wait_steps: int = Field(8, ge=0, description="continuous: decode steps a request may wait to join a "
                                 "running batch, so that joiners share one prefill (at once when they are a quarter of "
                                 "the running rows).")
    max_queue_size: int = Field(1024, ge=1, description="Most sequences waiting; more -> 429 Retry-After.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request not served by then gets 503.")
    max_streams: int = Field(64, ge=1, description="Most streamed sequences (prompts x n) in flight; more -> 429 "
                             "Retry-After (413 for one request asking for more).")


class GeneratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GENERATOR_")

    port: int = Field(8001, ge=0, le=65535, description="TCP port to bind.")
    model: str = Field(description="The base policy: a local folder or a hub id (served as `base`).")
    revision: str | None = Field(None, description="Hub revision of the base model.")
    checkpoints: Path | None = Field(None, description="Folder the trainer writes `<run>/step-<N>/` checkpoints to.")
    max_loaded_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in memory besides base (LRU).")
    max_concurrent_loads: int = Field(1, ge=1, description="Checkpoints loading at once; a request needing another "
                                      "-> 429 Retry-After. Memory holds at most base + max_loaded_checkpoints + "
                                      "max_concurrent_loads models.")
    max_prompts_per_request: int = Field(64, ge=1, description="More prompts in one request -> 413.")
    max_prompt_tokens: int = Field(512, ge=1, description="A longer prompt -> 413.")
    max_new_tokens_limit: int = Field(512, ge=1, description="Largest max_new_tokens a request may ask for.")
    max_num_return_sequences: int = Field(16, ge=1, description="Largest num_return_sequences (OpenAI `n`).")
    batching: GeneratorBatching = Field(default_factory=GeneratorBatching, description="Dynamic batching.")
