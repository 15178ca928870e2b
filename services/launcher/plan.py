"""What `rlhf up` will do, checked before anything starts: the preset, the trainer's full config (the preset's, the
model flags, every --set), the ports and the run folder. A mistake costs a second and says what to fix."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.trainer.config import run_flag_overrides
from shared.settings import problems
from shared.tiny.kit import kit_dir

if TYPE_CHECKING:
    from pydantic import ValidationError

    from services.trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORTS = (8000, 8001, 8002)


class UsageError(ValueError):
    """Bad input, found before anything started: exit 2 with this message."""


@dataclass(frozen=True)
class Preset:
    reward_model: str
    reward_label: str
    config: Path  # the trainer's config; the policy is its model.model_path
    needs_tiny_kit: bool


def presets(kit: Path) -> dict[str, Preset]:
    return {
        "tiny": Preset(str(kit / "tiny-sentiment"), "POSITIVE", ROOT / "configs" / "tiny.yaml", needs_tiny_kit=True),
        "imdb": Preset("lvwerra/distilbert-imdb", "POSITIVE", ROOT / "configs" / "ppo_sentiments.yaml",
                       needs_tiny_kit=False),
    }


@dataclass(frozen=True)
class UpOptions:
    """What `rlhf up` was asked for; a None model, label, run name or config means the preset's."""

    preset: str = "tiny"
    runs: Path = Path("runs")
    log_dir: Path = Path("runs/logs")
    ports: tuple[int, int, int] = DEFAULT_PORTS  # reward, generator, trainer
    overrides: tuple[str, ...] = ()
    reward_model: str | None = None
    reward_label: str | None = None
    policy_model: str | None = None
    run_name: str | None = None
    config: Path | None = None
    fresh: bool = False
    keep_serving: bool = False
    stop_grace: float | None = None  # None: RLHF_STOP_GRACE, else the trainer's default
    ready_timeout: float = 600.0


@dataclass(frozen=True)
class Plan:
    """A validated run: the trainer's full config and the models each service loads."""

    options: UpOptions
    preset: Preset
    config_path: Path
    sets: list[str]  # the trainer's --set overrides, the launcher's own first
    config: TrainerConfig
    grace: float  # seconds a stop gives the trainer to save

    @property
    def reward_model(self) -> str:
        return self.options.reward_model or self.preset.reward_model

    @property
    def reward_label(self) -> str:
        return self.options.reward_label or self.config.reward.label or self.preset.reward_label

    @property
    def policy(self) -> str:
        return str(self.config.model.model_path)

    def url(self, service: str) -> str:
        port = self.options.ports[("reward", "generator", "trainer").index(service)]
        return f"http://127.0.0.1:{port}"


def config_error(exc: ValidationError | ValueError) -> str:
    """Every bad key and why, one per line (on the first line when there is only one)."""
    found = problems(exc)
    if len(found) == 1:
        return f"invalid config: {found[0]}"
    return "invalid config:\n" + "\n".join(f"  {p}" for p in found)


def _flag_sets(options: UpOptions) -> list[str]:
    """The trainer's overrides that `rlhf up`'s own flags stand for."""
    sets = [f"model.model_path={options.policy_model}"] if options.policy_model else []
    if options.reward_label:
        sets.append(f"reward.label={options.reward_label}")
    return sets + run_flag_overrides(options.fresh, options.run_name)


def check_ports(ports: tuple[int, int, int]) -> None:
    names = ("reward", "generator", "trainer")
    for name, port in zip(names, ports):
        if not 1 <= port <= 65535:
            raise UsageError(f"--{name}-port {port} is not a port number (1-65535)")
    if len(set(ports)) != len(ports):
        raise UsageError(f"the three services need three different ports, got {ports}")
    for name, port in zip(names, ports):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise UsageError(f"port {port} (the {name} service's) is in use; stop what listens there or pass "
                                 f"--{name}-port") from None


def make_plan(options: UpOptions) -> Plan:
    """Check everything that can be checked in a second; UsageError says what is wrong."""
    from services.trainer.config import load_config, stop_grace_s

    known = presets(kit_dir())
    if options.preset not in known:
        raise UsageError(f"unknown preset {options.preset!r}; choose {' or '.join(known)}")
    preset = known[options.preset]
    reward_port, generator_port, _ = options.ports
    sets = [f"reward.url=http://127.0.0.1:{reward_port}", f"generator.url=http://127.0.0.1:{generator_port}",
            f"train.checkpoint_dir={options.runs}", *_flag_sets(options), *options.overrides]
    config_path = options.config or preset.config
    try:
        config = load_config(config_path, sets)
    except ValueError as exc:  # pydantic's ValidationError too
        raise UsageError(config_error(exc)) from None
    try:
        grace = stop_grace_s(options.stop_grace)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_ports(options.ports)
    return Plan(options, preset, Path(config_path), sets, config, grace)


def finished_run(config: TrainerConfig) -> str | None:
    """The trainer's refusal when the run has already finished (None when it may run); UsageError on a conflict.
    Both messages name --fresh and --run-name, which `rlhf up` takes too."""
    from services.trainer.preflight import RunFinished, RunRefused, check_run

    try:
        check_run(config)
    except RunFinished as exc:
        return str(exc)
    except RunRefused as exc:
        raise UsageError(str(exc)) from None
    return None

