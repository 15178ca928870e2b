"""The settings base every service extends: one pydantic-settings class per service, validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set `env_prefix` (e.g. `REWARD_`)."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0 picks a free one).")
    api_key: str | None = Field(None, description="When set, /v1 routes demand `Authorization: Bearer <api_key>`.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads; keep 1 when services share a machine.")
    device: str = Field("auto", description="`auto` (cuda when visible), `cpu`, `cuda` or `cuda:N`.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    log_level: str = Field("info", description="Python logging level.")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with the file named in every error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data
