"""`rlhf generator ...` and `rlhf generate`: the generator service's own commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from shared.settings import load_settings

app = typer.Typer(help="The generator service: serves the base policy and every checkpoint the trainer writes.",
                  no_args_is_help=True)


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Base policy: a local folder or a hub id.")] = None,
    checkpoints: Annotated[Optional[Path], typer.Option(help="Folder of trainer checkpoints.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file with any GeneratorSettings field.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to bind.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to bind.")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="Sequences decoding together (1: none).")] = None,
    batching_mode: Annotated[Optional[str], typer.Option(help="continuous (default) or static.")] = None,
    torch_threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda.")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning, error.")] = None,
    exit_on_load_failure: Annotated[Optional[bool], typer.Option(
        "--exit-on-load-failure/--no-exit-on-load-failure",
        help="Exit with code 1 when the base model fails to load (default); or stay up, unready.")] = None,
) -> None:
    """Serve POST /v1/generate, POST /v1/completions and GET /v1/models (OpenAI), GET /v1/checkpoints (see /docs)."""
    from services.generator.app import create_app
    from services.generator.settings import GeneratorSettings
    from shared.logs import setup_logging
    from shared.server import serve as serve_app

    flags = {"model": model, "checkpoints": checkpoints, "host": host, "port": port, "torch_threads": torch_threads,
             "device": device, "log_level": log_level, "exit_on_load_failure": exit_on_load_failure,
             "batching": {"max_batch_size": max_batch_size, "mode": batching_mode}}
    settings = load_settings(GeneratorSettings, config, flags, "generator settings")
    setup_logging(settings.log_level)
    serve_app(create_app(settings), settings.host, settings.port, settings.log_level)


def generate_command(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to continue.")],
    checkpoint: Annotated[str, typer.Option(help="base, latest or <run>/step-<N>.")] = "latest",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to add.")] = 40,
    greedy: Annotated[bool, typer.Option(help="Greedy decoding instead of sampling.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")] = None,
    url: Annotated[str, typer.Option(envvar="RLHF_GENERATOR_URL", help="Generator URL.")] = "http://127.0.0.1:8001",
    api_key: Annotated[Optional[str], typer.Option(envvar=["GENERATOR_API_KEY", "RLHF_API_KEY"],
                                                   help="The generator's API key.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole response as JSON.")] = False,
) -> None:
    """Print one completion (prompt + continuation) per prompt."""
    from shared.clients import GeneratorClient, RetryPolicy, ServiceError

    try:
        with GeneratorClient(url, api_key=api_key, retry=RetryPolicy(max_retries=2)) as client:
            body = client.generate(prompts, checkpoint=checkpoint, max_new_tokens=max_new_tokens,
                                   do_sample=not greedy, seed=seed)
    except ServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    typer.echo(f"# checkpoint: {body['checkpoint']}", err=True)
    for c in body["completions"]:
        typer.echo(c["text"])
