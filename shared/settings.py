"""The settings base every service extends (one pydantic-settings class per service, validated at start), and how
a command line turns a YAML file, flags and the environment into settings, or into one `error: ...` line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import Field, ValidationError
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
    exit_on_load_failure: bool = Field(
        True, description="Exit (code 1) when a startup model fails to load; off: stay up, /readyz says why.")


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


T = TypeVar("T")
S = TypeVar("S", bound=BaseSettings)


def _merged(base: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """`base` with the flags that were given (not None) on top; nested mappings merge key by key."""
    out = dict(base)
    for key, value in flags.items():
        if isinstance(value, dict):
            nested = out.get(key)
            value = _merged(nested if isinstance(nested, dict) else {}, value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out


def problems(exc: ValidationError | ValueError) -> list[str]:
    """`field: problem` for each error of a ValidationError; else the error's own message, on one line."""
    if not isinstance(exc, ValidationError):
        return [" ".join(str(exc).split())]
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        message = e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return parts


def describe(exc: ValidationError | ValueError) -> str:
    """One line: `field: problem; ...` for a ValidationError, else the error's own message."""
    return "; ".join(problems(exc))


def or_exit(what: str, load: Callable[[], T]) -> T:
    """`load()`, or, when it finds the settings invalid, `error: invalid <what>: <why>` on stderr and exit code 2
    (no traceback: the fix is in the user's input)."""
    try:
        return load()
    except (ValidationError, ValueError) as exc:
        print(f"error: invalid {what}: {describe(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def load_settings(cls: type[S], config: str | Path | None, flags: dict[str, Any], what: str) -> S:
    """`cls` from (lowest first) the environment, the YAML file `config`, then the CLI `flags` (None: not given;
    nested mappings merge into the file's); invalid -> `error: ...` and exit code 2."""
    return or_exit(what, lambda: cls(**_merged(read_yaml(config) if config else {}, flags)))
