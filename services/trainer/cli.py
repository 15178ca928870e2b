"""`rlhf train` and `rlhf trainer serve`: the trainer's own commands."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer

from services.trainer.config import DEFAULT_STOP_GRACE_S, run_flag_overrides
from shared.logs import setup_logging
from shared.settings import or_exit
from shared.tiny.kit import ensure_built, kit_dir

app = typer.Typer(help="The PPO trainer.", no_args_is_help=True)

ConfigOption = Annotated[Path, typer.Option("--config", help="Trainer YAML (see configs/).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override: section.key=value (repeatable).")]
GeneratorKey = Annotated[Optional[str], typer.Option(envvar="GENERATOR_API_KEY", help="The generator's API key.")]
RewardKey = Annotated[Optional[str], typer.Option(envvar="REWARD_API_KEY", help="The reward service's API key.")]
FreshOption = Annotated[bool, typer.Option("--fresh", help="Start the run over from step 0 (train.resume=false); the "
                                           "old run folder is kept, moved aside to <run>.replaced-<UTC time>.")]
RunNameOption = Annotated[Optional[str], typer.Option("--run-name", help="The run's folder under the checkpoint root "
                                                      "(train.run_name); another name starts another run.")]


def _load(config: Path, overrides: list[str] | None):
    """The trainer config, or `error: invalid trainer config ...` and exit code 2."""
    from services.trainer.config import load_config

    return or_exit(f"trainer config {config}", lambda: load_config(config, overrides or []))


def _ensure_tiny_kit(cfg) -> None:
    """The tiny preset builds its kit when missing (shared/tiny/kit.py: RLHF_TINY_DIR, default .cache/tiny)."""
    kit = kit_dir()
    if cfg.data.source == "tiny" and str(cfg.model.model_path).startswith(str(kit)):
        ensure_built(kit, echo=lambda line: typer.echo(line, err=True))


def _check_run(cfg) -> None:
    """Say at once, before any model loads, that the run already finished (exit 0) or cannot resume (exit 2)."""
    from services.trainer.preflight import RunFinished, RunRefused, check_run

    try:
        check_run(cfg)
    except RunFinished as done:
        typer.echo(str(done))
        raise typer.Exit(0) from None
    except RunRefused as refused:
        typer.echo(f"error: {refused}", err=True)
        raise typer.Exit(2) from None


def train_command(config: ConfigOption, overrides: SetOption = None, fresh: FreshOption = False,
                  run_name: RunNameOption = None) -> None:
    """Run a PPO job in the foreground with a progress bar; resumes from the run's last checkpoint (--fresh: starts
    over, keeping the old run aside)."""
    from services.trainer.run import train

    cfg = _load(config, [*(overrides or []), *run_flag_overrides(fresh, run_name)])
    _check_run(cfg)
    setup_logging("info")
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
    fresh: FreshOption = False,
    run_name: RunNameOption = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8002,
    api_key: Annotated[Optional[str], typer.Option(envvar="TRAINER_API_KEY", help="Bearer key for /v1.")] = None,
    exit_when_done: Annotated[bool, typer.Option(help="Stop serving when the job ends.")] = False,
    stop_grace: Annotated[Optional[float], typer.Option(
        "--stop-grace", envvar="RLHF_STOP_GRACE", min=0.1,
        help=f"Seconds a shutdown waits for the job to finish its iteration and save (default "
             f"{DEFAULT_STOP_GRACE_S:g}).")] = None,
) -> None:
    """Run the job and serve GET /v1/status, GET /v1/metrics, POST /v1/stop, /healthz, /readyz, /metrics."""
    import uvicorn

    from services.trainer.app import create_app
    from services.trainer.config import stop_grace_s

    cfg = _load(config, [*(overrides or []), *run_flag_overrides(fresh, run_name)])
    setup_logging("info")
    _ensure_tiny_kit(cfg)
    application = create_app(cfg, api_key=api_key, stop_grace_s=stop_grace_s(stop_grace))
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


def compare_command(
    checkpoint: Annotated[str, typer.Option(help="Checkpoint to compare with base: latest or <run>/step-<N>.")],
    prompts: Annotated[str, typer.Option(help="positive, negative, neutral, or a prompts file.")] = "neutral",
    samples: Annotated[int, typer.Option(help="Samples per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per completion.")] = 30,
    seed: Annotated[int, typer.Option(help="Same seeds for base and checkpoint.")] = 0,
    generator_url: Annotated[str, typer.Option("--generator", envvar="RLHF_GENERATOR_URL")] = "http://127.0.0.1:8001",
    reward_url: Annotated[str, typer.Option("--reward", envvar="RLHF_REWARD_URL")] = "http://127.0.0.1:8000",
    generator_key: GeneratorKey = None,
    reward_key: RewardKey = None,
    out: Annotated[Path, typer.Option(help="Folder for compare.json and compare.md.")] = Path("runs/compare"),
) -> None:
    """Base vs a checkpoint on the same prompts and seeds: mean reward, fraction judged positive, example pairs."""
    import json

    from services.trainer.experiments import compare, compare_markdown, load_prompts
    from shared.clients import GeneratorClient, RetryPolicy, RewardClient, ServiceError

    try:
        prompt_list = load_prompts(prompts)
        retry = RetryPolicy(max_retries=2)
        with GeneratorClient(generator_url, api_key=generator_key, retry=retry) as g, \
                RewardClient(reward_url, api_key=reward_key, retry=retry) as r:
            result = compare(g, r, checkpoint, prompt_list, samples, max_new_tokens, seed)
    except (ValueError, ServiceError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "compare.md").write_text(compare_markdown(result))
    b, t = result["base"], result["trained"]
    typer.echo(f"{'':<22}{'base':>10}{result['checkpoint']:>18}")
    typer.echo(f"{'mean reward':<22}{b['mean_reward']:>10.3f}{t['mean_reward']:>18.3f}")
    typer.echo(f"{'positive fraction':<22}{b['positive_fraction']:>10.3f}{t['positive_fraction']:>18.3f}")
    for e in result["examples"][:3]:
        typer.echo(f"\n{e['prompt']!r}\n  base    ({e['base_score']:.2f}): {e['base']}\n"
                   f"  trained ({e['trained_score']:.2f}): {e['trained']}")
    typer.echo(f"\nwritten: {out / 'compare.json'}, {out / 'compare.md'}")


def best_string_command(
    checkpoint: Annotated[str, typer.Option(help="latest or <run>/step-<N>.")] = "latest",
    budget: Annotated[int, typer.Option(help="Texts to generate and score in all.")] = 256,
    prompts: Annotated[str, typer.Option(help="positive, negative, neutral, or a prompts file.")] = "neutral",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per completion.")] = 30,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    checkpoints: Annotated[Path, typer.Option(help="Checkpoint root, to compute log-probabilities.")] = Path("runs"),
    generator_url: Annotated[str, typer.Option("--generator", envvar="RLHF_GENERATOR_URL")] = "http://127.0.0.1:8001",
    reward_url: Annotated[str, typer.Option("--reward", envvar="RLHF_REWARD_URL")] = "http://127.0.0.1:8000",
    generator_key: GeneratorKey = None,
    reward_key: RewardKey = None,
    out: Annotated[Path, typer.Option(help="Folder for best_string.json.")] = Path("runs/best-string"),
) -> None:
    """Search for the text the reward model scores highest that the policy would plausibly write."""
    import json

    from services.trainer.experiments import best_string, load_prompts, policy_logprob
    from shared.checkpoints import checkpoint_path
    from shared.clients import GeneratorClient, RetryPolicy, RewardClient, ServiceError

    if budget < 2:
        raise typer.BadParameter("budget must be at least 2", param_hint="--budget")
    try:
        retry = RetryPolicy(max_retries=2)
        with GeneratorClient(generator_url, api_key=generator_key, retry=retry) as g, \
                RewardClient(reward_url, api_key=reward_key, retry=retry) as r:
            resolved = checkpoint
            if checkpoint == "latest":
                resolved = next(c["name"] for c in g.checkpoints() if c["latest"])
            result = best_string(g, r, resolved, load_prompts(prompts), budget, max_new_tokens, seed)
    except (ValueError, ServiceError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = None if resolved == "base" else checkpoint_path(checkpoints, resolved)
    if path is not None and path.is_dir():
        model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        for entry in result["top"]:
            entry["logprob"] = policy_logprob(model, tok, entry["prompt"], entry["text"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "best_string.json").write_text(json.dumps(result, indent=2))
    typer.echo(f"{result['evaluated']} texts scored; best sampled score {result['best_sampled_score']:.4f}")
    for e in result["top"]:
        lp = f"{e['logprob']:8.2f}" if "logprob" in e else "     n/a"
        typer.echo(f"{e['score']:.4f}  logprob {lp}  {e['text']}")
    typer.echo(f"written: {out / 'best_string.json'}")
