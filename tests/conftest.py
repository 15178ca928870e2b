"""Shared fixtures: offline mode, pinned torch threads, the tiny kit, and real uvicorn servers on loopback."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail fast, not retry for ~50 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import uvicorn  # noqa: E402

from shared.readiness import wait_until_ready  # noqa: E402
from shared.runtime import configure_torch  # noqa: E402
from shared.server import stop_on_load_failure  # noqa: E402
from shared.tiny.kit import ensure_built, kit_dir  # noqa: E402

configure_torch(1)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_kit() -> Path:
    """The offline tiny kit (shared/tiny/kit.py), built once (about two minutes on 2 cores) and reused across runs;
    an absolute path, so that subprocesses may run elsewhere."""
    out = ensure_built(kit_dir().resolve())
    configure_torch(1)  # the build may have changed it
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a background thread, with its own event loop. As under `serve`, a
    startup model load that fails stops it, unless the app's settings say exit_on_load_failure=False."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        stop_on_load_failure(app, self.server)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def _alive(self) -> None:
        if not self.thread.is_alive():
            why = getattr(getattr(self.app.state, "loading", None), "failure", None)
            raise RuntimeError(f"server on {self.url} stopped before it was ready" + (f": {why}" if why else ""))

    def start(self, ready_path: str = "/readyz", timeout: float = 60) -> ServerThread:
        self.thread.start()
        wait_until_ready(self.url, timeout, path=ready_path, alive=self._alive)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def serve():
    """Start apps as real servers; all are stopped when the test ends."""
    servers: list[ServerThread] = []

    def start(app, **kw) -> ServerThread:
        server = ServerThread(app).start(**kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def framework_python() -> Path:
    """The framework environment's interpreter: RLHF_TRL_PYTHON, else .cache/trl-env, built (or checked) by make."""
    if os.environ.get("RLHF_TRL_PYTHON"):
        return Path(os.environ["RLHF_TRL_PYTHON"])
    done = subprocess.run(["make", "-s", "trl-env"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"make trl-env failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return ROOT / ".cache" / "trl-env" / "bin" / "python"
