"""The `rlhf` command: the composition root, the one module that imports every service's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from services.generator.cli import app as generator_app
from services.generator.cli import generate_command
from services.reward.cli import app as reward_app
from services.reward.cli import score_command
from services.trainer.cli import app as trainer_app
from services.trainer.cli import train_command

app = typer.Typer(help="RLHF as services: reward, generator and PPO trainer.", no_args_is_help=True)
models_app = typer.Typer(help="Model kits.", no_args_is_help=True)

app.add_typer(reward_app, name="reward")
app.add_typer(models_app, name="models")
app.add_typer(generator_app, name="generator")
app.command("score")(score_command)
app.command("generate")(generate_command)
app.add_typer(trainer_app, name="trainer")
app.command("train")(train_command)


@models_app.command("build-tiny")
def build_tiny(
    out: Annotated[Path, typer.Option(help="Folder for the kit (reused when already built).")] = Path(".cache/tiny"),
    threads: Annotated[int, typer.Option(help="torch threads for training.")] = 2,
) -> None:
    """Build the offline tiny kit: corpus, tiny GPT-2 policy, two tiny sentiment classifiers. Prints the report."""
    from shared.runtime import configure_torch
    from shared.tiny.build import build_tiny as build

    configure_torch(threads)
    report = build(out, threads=threads)
    typer.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    app()
