"""`rlhf reward ...` and `rlhf score`: the reward service's own commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from shared.settings import load_settings

app = typer.Typer(help="The reward service: batched sentiment (or any classifier) scoring over HTTP.",
                  no_args_is_help=True)


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Model source: a local folder or a hub id.")] = None,
    label: Annotated[Optional[str], typer.Option(help="Reward label name (default POSITIVE).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of --model for clients.")] = None,
    score: Annotated[Optional[str], typer.Option(help="prob or logit.")] = None,
    backend: Annotated[Optional[str], typer.Option(help="What runs --model: torch, onnx or auto.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="--model's precision: float32, bfloat16, float16 (GPU) for "
                                                 "torch; float32, int8 for onnx.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file: models, batching, limits, keys.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to bind.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to bind.")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="Texts per forward pass (1: no batching).")] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option(help="How long a batch waits to fill.")] = None,
    torch_threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda.")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning, error.")] = None,
    exit_on_load_failure: Annotated[Optional[bool], typer.Option(
        "--exit-on-load-failure/--no-exit-on-load-failure",
        help="Exit with code 1 when a startup model fails to load (default); or stay up for the admin API.")] = None,
) -> None:
    """Serve reward models over HTTP (POST /v1/score, /v1/classify; GET /v1/models; docs at /docs)."""
    from services.reward.app import create_app
    from services.reward.settings import RewardSettings
    from shared.logs import setup_logging
    from shared.server import serve as serve_app

    flags = {"model": model, "label": label, "name": name, "score": score, "backend": backend, "dtype": dtype,
             "host": host, "port": port, "torch_threads": torch_threads, "device": device, "log_level": log_level,
             "exit_on_load_failure": exit_on_load_failure,
             "batching": {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms}}
    settings = load_settings(RewardSettings, config, flags, "reward service settings")
    setup_logging(settings.log_level)
    serve_app(create_app(settings), settings.host, settings.port, settings.log_level)


def score_command(
    texts: Annotated[list[str], typer.Argument(help="Texts to score.")],
    url: Annotated[str, typer.Option(envvar="RLHF_REWARD_URL", help="Reward service URL.")] = "http://127.0.0.1:8000",
    model: Annotated[Optional[str], typer.Option(help="Model name (default model when omitted).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar=["REWARD_API_KEY", "RLHF_API_KEY"],
                                                   help="The reward service's API key.")] = None,
) -> None:
    """Print one score per text, one per line, in order."""
    from shared.clients import RetryPolicy, RewardClient, ServiceError

    try:
        with RewardClient(url, model=model, api_key=api_key, retry=RetryPolicy(max_retries=2)) as client:
            scores = client.score(texts)
    except ServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for s in scores:
        sys.stdout.write(f"{s:.6f}\n")
