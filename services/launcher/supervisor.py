"""The launcher's child processes: each service in its own session with its own log, watched, and stopped newest
first with SIGTERM, then SIGKILL for its whole group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.checkpoints import atomic_write_text
from shared.readiness import LoadFailed, NotReady, wait_until_ready

STATUS_POLL_S = 1.0


class LaunchError(RuntimeError):
    """A service failed: the launcher stops everything and exits 1 with this message."""


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    ready_path: str
    log: Path
    loading: str = ""  # what it loads, for the messages
    stop_grace: float = 20.0  # seconds between SIGTERM and SIGKILL
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    ready: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Supervisor:
    """Starts, watches and stops the services; every child leads its own process group."""

    log_dir: Path
    services: list[Service] = field(default_factory=list)

    def start(self, service: Service) -> Service:
        service.log.parent.mkdir(parents=True, exist_ok=True)
        service.started_at = time.monotonic()
        with service.log.open("ab") as log:
            service.process = subprocess.Popen(service.argv, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.services.append(service)
        # atomically: whoever watches the file (a test, an operator's script) never reads it half-written
        atomic_write_text(self.log_dir / "pids.json", json.dumps({s.name: s.process.pid for s in self.services}))
        return service

    def check_alive(self, allow_exit: str | None = None) -> None:
        for s in self.services:
            code = s.process.poll()
            if code is None or s.name == allow_exit:
                continue
            if not s.ready:
                raise LaunchError(f"the {s.name} service could not start (exit code {code}) loading {s.loading}; "
                                  f"the end of its log ({s.log}):\n{_tail(s.log)}")
            raise LaunchError(f"the {s.name} service exited unexpectedly (code {code}); see {s.log}\n{_tail(s.log)}")

    def wait_ready(self, service: Service, timeout: float) -> float:
        """Seconds from its start until `service` answered ready; LaunchError (its own reason) when it cannot be."""
        try:
            wait_until_ready(service.url, timeout, path=service.ready_path, alive=self.check_alive,
                             max_delay=STATUS_POLL_S)
        except LoadFailed as exc:
            raise LaunchError(f"the {service.name} service could not load {service.loading}: {exc}\n"
                              f"(log: {service.log})") from None
        except NotReady as exc:
            raise LaunchError(f"the {service.name} service was not ready after {timeout:.0f} s ({exc}); "
                              f"see {service.log}") from None
        service.ready = True
        return time.monotonic() - service.started_at

    def stop_all(self) -> None:
        """Stop the services one at a time, newest first: the trainer finishes its iteration and saves while the
        reward service still answers. Each gets SIGTERM, then SIGKILL (its whole group) after its `stop_grace`."""
        for s in reversed(self.services):
            _signal_group(s.process, signal.SIGTERM)
            try:
                s.process.wait(timeout=s.stop_grace)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(s.process, signal.SIGKILL)  # the group too: no grandchild outlives the launcher
            s.process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _rlhf(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]

