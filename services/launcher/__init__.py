"""`rlhf up`: the whole system as local processes (reward, generator, trainer) on loopback, no Docker needed.

Everything a run needs is checked first (preset, ports, the trainer's full config, the run folder), so a mistake
costs seconds, not a kit build or a model load. Then each service runs in its own session with its own log; the
launcher says what each one loads and when it is ready, shows training as one live line from the trainer's
/v1/status, writes where the report is, and stops every process it started on the way out: on success, on Ctrl-C,
and when any service dies (then with that service's own words and a non-zero exit). With `keep_serving` the
services stay up after training, for the commands it prints, until Ctrl-C.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from services.launcher.plan import DEFAULT_PORTS, Plan, UpOptions, UsageError, finished_run, make_plan, presets
from services.launcher.progress import (
    DONE_STATES,
    TrainingProgress,
    _duration,
    _fetch_status,
    status_from_metrics,
    status_line,
)
from services.launcher.supervisor import STATUS_POLL_S, LaunchError, Service, Supervisor, _rlhf, _tail
from services.trainer.report import read_metrics
from shared.checkpoints import scan_checkpoints
from shared.tiny.kit import ensure_built, is_built, kit_dir

__all__ = ["UpOptions", "TrainingProgress", "presets", "status_line", "up"]

TRAINER_EXIT_MARGIN_S = 15.0  # after its save: the trainer's server shutdown and interpreter exit
REPORT_WAIT_S = 300.0  # after "finished": the trainer generates and scores its report through the services
EXAMPLE_TEXTS = ("A wonderful, moving film.", "A dull and boring mess.")
EXAMPLE_PROMPT = "This movie was"


def latest_checkpoint(runs: Path, run_name: str) -> str | None:
    """The newest complete checkpoint of the run, by step."""
    steps = [c for c in scan_checkpoints(runs) if c.run == run_name and c.valid]
    return max(steps, key=lambda c: c.step).name if steps else None


def next_commands(plan: Plan, checkpoint: str | None, trainer_running: bool) -> list[str]:
    """What to try against the running services, with the flags that non-default ports and folders need."""
    o = plan.options
    reward, generator = plan.url("reward"), plan.url("generator")
    default_ports = o.ports == DEFAULT_PORTS
    url = (lambda u: f" --url {u}") if not default_ports else (lambda u: "")
    both = "" if default_ports else f" --generator {generator} --reward {reward}"
    runs = "" if Path(o.runs).resolve() == Path("runs").resolve() else f" --checkpoints {shlex.quote(str(o.runs))}"
    texts = " ".join(shlex.quote(t) for t in EXAMPLE_TEXTS)
    body = json.dumps({"texts": list(EXAMPLE_TEXTS)})
    lines = [
        f"curl -s {reward}/v1/score -H 'content-type: application/json' -d '{body}'",
        f"rlhf score{url(reward)} {texts}",
        f"rlhf generate{url(generator)} --checkpoint {checkpoint or 'latest'} {shlex.quote(EXAMPLE_PROMPT)}",
        f"rlhf compare{both} --checkpoint latest",
        f"rlhf best-string{both}{runs}",
    ]
    if trainer_running:
        lines.append(f"the trainer's live page: {plan.url('trainer')}/")
    return lines


@dataclass
class Launch:
    """One `rlhf up`: the services started, what training did, and how to stop."""

    plan: Plan
    echo: Callable[[str], None]
    stream: TextIO
    supervisor: Supervisor = field(init=False)
    stop_reason: list[str] = field(default_factory=list)
    serving: bool = False  # training is over (or was already): a stop now is the normal end

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.plan.options.log_dir)

    def run(self, train: bool) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._ensure_kit()
            self._start_model_services()
            if train:
                self._train()
            else:
                self.serving = True
                self.echo(f"serving the finished run's checkpoints (report: {self.plan.config.run_dir / 'report.md'})")
            if not self.plan.options.keep_serving:
                return 0
            self._serve(trainer_running=train)  # until a signal or a service's death
        except LaunchError as exc:
            self.echo(f"error: {exc}")
            return 1
        except KeyboardInterrupt:
            return self._interrupted()
        finally:
            self._stop(previous)
        return 0

    def _on_signal(self, signum, _frame) -> None:
        self.stop_reason.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    def _interrupted(self) -> int:
        reason = self.stop_reason[0] if self.stop_reason else "interrupt"
        if self.serving:
            self.echo(f"stopping the services on {reason}")
            return 0
        trainer = any(s.name == "trainer" for s in self.supervisor.services)
        self.echo(f"stopping on {reason}" + (": the trainer saves a checkpoint first" if trainer else ""))
        return 130

    def _stop(self, previous: dict) -> None:
        for sig in previous:  # a second Ctrl-C must not cut the trainer's save short
            signal.signal(sig, lambda *_: self.echo(
                f"already stopping: the trainer may take up to {self.plan.grace:.0f} s to save"))
        self.supervisor.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _ensure_kit(self) -> None:
        kit = kit_dir()
        if not self.plan.preset.needs_tiny_kit or is_built(kit):
            return
        started = time.monotonic()
        ensure_built(kit, self.echo)
        self.echo(f"tiny kit built in {_duration(time.monotonic() - started)}")

    def _start_model_services(self) -> None:
        p, o = self.plan, self.plan.options
        reward_args = ["--model", p.reward_model, "--label", p.reward_label]
        if p.config.reward.model:  # the name the trainer asks for
            reward_args += ["--name", p.config.reward.model]
        reward = Service("reward", _rlhf("reward", "serve", *reward_args, "--port", str(o.ports[0]),
                                         "--log-level", "warning"),
                         o.ports[0], "/readyz", o.log_dir / "reward.log",
                         loading=f"{p.reward_model} (reward label {p.reward_label})")
        generator = Service("generator", _rlhf("generator", "serve", "--model", p.policy, "--checkpoints",
                                               str(o.runs), "--port", str(o.ports[1]), "--log-level", "warning"),
                            o.ports[1], "/readyz", o.log_dir / "generator.log",
                            loading=f"{p.policy} (base policy; checkpoints from {o.runs})")
        for service in (reward, generator):
            self.echo(f"{service.name}: loading {service.loading} (log: {service.log})")
            self.supervisor.start(service)
        for service in (reward, generator):
            seconds = self.supervisor.wait_ready(service, o.ready_timeout)
            self.echo(f"{service.name}: ready in {seconds:.1f} s at {service.url}")

    def _start_trainer(self) -> Service:
        p, o = self.plan, self.plan.options
        argv = _rlhf("trainer", "serve", "--config", str(p.config_path), "--port", str(o.ports[2]),
                     "--stop-grace", str(p.grace), *[a for s in p.sets for a in ("--set", s)])
        if not o.keep_serving:
            argv.append("--exit-when-done")
        trainer = Service("trainer", argv, o.ports[2], "/healthz", o.log_dir / "trainer.log",
                          loading=f"{p.policy} for PPO", stop_grace=p.grace + TRAINER_EXIT_MARGIN_S)
        self.echo(f"trainer: PPO on {p.policy}, {p.config.train.total_steps} iterations, run folder "
                  f"{p.config.run_dir} (log: {trainer.log})")
        self.supervisor.start(trainer)
        seconds = self.supervisor.wait_ready(trainer, o.ready_timeout)
        self.echo(f"trainer: ready in {seconds:.1f} s; live page {trainer.url}/")
        return trainer

    def _train(self) -> None:
        trainer = self._start_trainer()
        progress = TrainingProgress(self.stream)
        try:
            status = self._watch(trainer, progress)
            if trainer.process.returncode == 0:  # exited between two polls: its metrics have the last iteration
                config = self.plan.config
                progress.show(status_from_metrics(read_metrics(config.run_dir), config.train.total_steps, "finished"))
        finally:
            progress.close()
        if self.plan.options.keep_serving:
            self._check_outcome(trainer, status)
        else:
            self._check_exit(trainer)
        self.serving = True

    def _watch(self, trainer: Service, progress: TrainingProgress) -> dict:
        """Poll the trainer's status until the job ends: its exit (exit-when-done) or a final state."""
        exits = not self.plan.options.keep_serving
        status: dict = {}
        while not (exits and trainer.process.poll() is not None):
            self.supervisor.check_alive(allow_exit="trainer" if exits else None)
            status = _fetch_status(trainer.url) or status
            progress.show(status)
            if not exits and status.get("state") in DONE_STATES:
                break
            time.sleep(STATUS_POLL_S)
        return status

    def _check_exit(self, trainer: Service) -> None:
        self.supervisor.check_alive(allow_exit="trainer")
        if trainer.process.returncode != 0:
            raise LaunchError(f"training failed (exit code {trainer.process.returncode}); see {trainer.log}\n"
                              f"{_tail(trainer.log)}")
        report = self.plan.config.run_dir / "report.md"
        if not report.exists():
            raise LaunchError(f"training finished but wrote no report; see {trainer.log}\n{_tail(trainer.log)}")
        self.echo(f"training finished; report: {report} and {report.with_suffix('.png')}")

    def _check_outcome(self, trainer: Service, status: dict) -> None:
        state = status.get("state")
        if state == "failed":
            raise LaunchError(f"training failed: {status.get('error')}; see {trainer.log}\n{_tail(trainer.log)}")
        if state == "stopped":
            self.echo(f"training stopped at iteration {status.get('step')}/{status.get('total')}; its checkpoints "
                      "are served")
            return
        report = self._await_report(trainer, status)
        self.echo(f"training finished; report: {report} and {report.with_suffix('.png')}")

    def _await_report(self, trainer: Service, status: dict) -> Path:
        """The report's path from the trainer's status: the native engine says "finished" once it is written, the
        trlX engine just before it writes it."""
        deadline = time.monotonic() + REPORT_WAIT_S
        while not (status.get("report") or status.get("report_error")) and time.monotonic() < deadline:
            self.supervisor.check_alive()
            time.sleep(0.5)
            status = _fetch_status(trainer.url) or status
        if status.get("report"):
            return Path(status["report"])
        why = status.get("report_error") or f"none after {REPORT_WAIT_S:.0f} s"
        raise LaunchError(f"training finished but wrote no report ({why}); see {trainer.log}\n{_tail(trainer.log)}")

    def _serve(self, trainer_running: bool) -> None:
        p = self.plan
        checkpoint = latest_checkpoint(p.options.runs, p.config.train.run_name)
        self.echo("\nThe services keep serving. Next commands to try:")
        for line in next_commands(p, checkpoint, trainer_running):
            self.echo(f"  {line}")
        self.echo("Ctrl-C stops all the services.")
        while True:
            self.supervisor.check_alive()
            time.sleep(STATUS_POLL_S)


def up(options: UpOptions, echo=print, stream: TextIO | None = None) -> int:
    """Run `options` end to end; returns the exit code: 0 trained (or already finished) and reported, and with
    `keep_serving` stopped by Ctrl-C after that; 1 a service failed; 2 bad input (nothing started); 130 stopped
    during training."""
    try:
        plan = make_plan(options)
        finished = finished_run(plan.config)
    except UsageError as exc:
        echo(f"error: {exc}")
        return 2
    if finished:
        echo(finished)
        if not options.keep_serving:
            return 0
    options.log_dir.mkdir(parents=True, exist_ok=True)
    return Launch(plan, echo, stream or sys.stdout).run(train=not finished)

