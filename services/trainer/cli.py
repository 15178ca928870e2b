"""`rlhf train` and `rlhf trainer serve`: the trainer's own commands."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

app = typer.Typer(help="The PPO trainer.", no_args_is_help=True)

ConfigOption = Annotated[Path, typer.Option("--config", help="Trainer YAML (see configs/).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override: section.key=value (repeatable).")]


def _load(config: Path, overrides: list[str] | None):
    from services.trainer.config import load_config

    try:
        return load_config(config, overrides or [])
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: invalid trainer config {config}:\n{exc}", err=True)
        raise typer.Exit(2) from None


def _ensure_tiny_kit(cfg) -> None:
    """The tiny preset builds its kit when missing (RLHF_TINY_DIR, default .cache/tiny)."""
    from services.trainer.data import tiny_kit_dir

    kit = tiny_kit_dir()
    if cfg.data.source == "tiny" and str(cfg.model.model_path).startswith(str(kit)) and \
            not (kit / "report.json").exists():
        from shared.tiny.build import build_tiny

        typer.echo(f"building the tiny kit in {kit} (about 2 minutes)...", err=True)
        build_tiny(kit)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per reward request drowns the progress bar


def train_command(config: ConfigOption, overrides: SetOption = None) -> None:
    """Run a PPO job in the foreground with a progress bar; resumes from the run's last checkpoint."""
    from services.trainer.run import train

    cfg = _load(config, overrides)
    _logging()
    _ensure_tiny_kit(cfg)
    try:
        status = train(cfg)
    except Exception as exc:  # noqa: BLE001 - one clear line and a non-zero exit
        typer.echo(f"error: training failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{status.state}: step {status.step}/{status.total}, eval reward {status.eval_reward_mean}, "
               f"last checkpoint {status.last_checkpoint}, best {status.best_checkpoint}")


@app.command()
def serve(
    config: ConfigOption,
    overrides: SetOption = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8002,
    api_key: Annotated[Optional[str], typer.Option(envvar="TRAINER_API_KEY", help="Bearer key for /v1.")] = None,
    exit_when_done: Annotated[bool, typer.Option(help="Stop serving when the job ends.")] = False,
) -> None:
    """Run the job and serve GET /v1/status, GET /v1/metrics, POST /v1/stop, /healthz, /readyz, /metrics."""
    import uvicorn

    from services.trainer.app import create_app

    cfg = _load(config, overrides)
    _logging()
    _ensure_tiny_kit(cfg)
    application = create_app(cfg, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="info"))
    if not exit_when_done:
        server.run()
        return

    async def serve_until_done() -> None:
        async def watch() -> None:
            await asyncio.to_thread(application.state.done.wait)
            server.should_exit = True

        await asyncio.gather(server.serve(), watch())

    asyncio.run(serve_until_done())
    if application.state.status.state not in ("finished", "stopped"):
        raise typer.Exit(1)
