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
from services.trainer.cli import best_string_command, compare_command, train_command
from services.trainer.data_cli import app as data_app

app = typer.Typer(help="RLHF as services: reward, generator and PPO trainer.", no_args_is_help=True)
models_app = typer.Typer(help="Model kits.", no_args_is_help=True)

app.add_typer(reward_app, name="reward")
app.add_typer(models_app, name="models")
app.add_typer(generator_app, name="generator")
app.command("score")(score_command)
app.command("generate")(generate_command)
app.add_typer(trainer_app, name="trainer")
app.command("train")(train_command)
app.add_typer(data_app, name="data")
app.command("compare")(compare_command)
app.command("best-string")(best_string_command)


@app.command("up")
def up_command(
    preset: Annotated[str, typer.Option(help="tiny (offline, CPU, minutes) or imdb (hub models).")] = "tiny",
    runs: Annotated[Path, typer.Option(help="Checkpoint root shared by trainer and generator.")] = Path("runs"),
    logs: Annotated[Path, typer.Option(help="One log per service.")] = Path("runs/logs"),
    reward_port: Annotated[int, typer.Option(min=1, max=65535, help="Reward service port.")] = 8000,
    generator_port: Annotated[int, typer.Option(min=1, max=65535, help="Generator service port.")] = 8001,
    trainer_port: Annotated[int, typer.Option(min=1, max=65535, help="Trainer service port.")] = 8002,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Trainer config override (repeatable).")] = None,
    reward_model: Annotated[str | None, typer.Option(
        help="Reward model: a local folder or a hub id (default: the preset's).")] = None,
    reward_label: Annotated[str | None, typer.Option(
        help="Label whose probability is the reward, by name (default: the config's, else the preset's).")] = None,
    policy_model: Annotated[str | None, typer.Option(
        help="Policy to train and the generator's base: a local folder or a hub id (default: the config's).")] = None,
    run_name: Annotated[str | None, typer.Option(help="Run folder under --runs (default: the config's).")] = None,
    config: Annotated[Path | None, typer.Option(help="Trainer YAML (default: the preset's).")] = None,
    fresh: Annotated[bool, typer.Option(
        help="Start the run over instead of resuming it (the old run's files are kept aside).")] = False,
    keep_serving: Annotated[bool, typer.Option(
        help="After training and the report, keep the services serving until Ctrl-C.")] = False,
    stop_grace: Annotated[float | None, typer.Option(
        "--stop-grace", envvar="RLHF_STOP_GRACE", min=0.1,
        help="Seconds a stop gives the trainer to finish its iteration and save.")] = None,
) -> None:
    """The whole system as local processes: reward, generator and trainer; a report when training ends."""
    from services.launcher import UpOptions, up

    options = UpOptions(preset=preset, runs=runs.resolve(), log_dir=logs.resolve(),
                        ports=(reward_port, generator_port, trainer_port), overrides=tuple(overrides or ()),
                        reward_model=reward_model, reward_label=reward_label, policy_model=policy_model,
                        run_name=run_name, config=config, fresh=fresh, keep_serving=keep_serving,
                        stop_grace=stop_grace)
    raise typer.Exit(up(options, echo=lambda line: typer.echo(line, err=line.startswith("error"))))


@models_app.command("build-tiny")
def build_tiny(
    out: Annotated[Path | None, typer.Option(
        help="Folder for the kit, reused when already built (default: $RLHF_TINY_DIR, else .cache/tiny).")] = None,
    threads: Annotated[int, typer.Option(help="torch threads for training.")] = 2,
) -> None:
    """Build the offline tiny kit: corpus, tiny GPT-2 policy, two tiny sentiment classifiers. Prints the report."""
    from shared.runtime import configure_torch
    from shared.tiny.build import build_tiny as build
    from shared.tiny.kit import kit_dir

    configure_torch(threads)
    report = build(out or kit_dir(), threads=threads, progress=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    app()
