"""The README's "after `make demo`" commands, run in order exactly as written, against `rlhf up --keep-serving` on the
default ports; then Ctrl-C stops everything with exit code 0."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.test_up import OutputReader, alive

pytestmark = pytest.mark.slow

MARKER = "<!-- after-demo: run in order -->"
DEFAULT_PORTS = (8000, 8001, 8002)
STEPS = 4


def after_demo_commands() -> list[str]:
    """The commands of the fenced block right after the README's marker; `\\` continues a line."""
    readme = (ROOT / "README.md").read_text()
    assert MARKER in readme, f"README.md has no {MARKER!r} block"
    block = re.match(r"\s*```(?:bash|sh)\n(.*?)\n```", readme.split(MARKER, 1)[1], re.S)
    assert block, f"no fenced block right after {MARKER!r} in README.md"
    joined = block.group(1).replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def require_free_default_ports() -> None:
    for port in DEFAULT_PORTS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pytest.fail(f"the README's commands use the default ports {DEFAULT_PORTS} and port {port} is in use: "
                            "stop what listens there to run this test")


def check_curl_score(out: str, err: str) -> None:
    scores = json.loads(out)["scores"]
    assert len(scores) == 2 and scores[0] > 0.5 > scores[1], out  # the positive text first, the negative second


def check_rlhf_score(out: str, err: str) -> None:
    scores = [float(line) for line in out.split()]
    assert len(scores) == 2 and scores[0] > 0.5 > scores[1], out


def check_generate(out: str, err: str) -> None:
    assert out.startswith("This movie was") and len(out.strip()) > len("This movie was"), out
    assert f"# checkpoint: tiny/step-{STEPS}" in err  # the trained checkpoint, not the base


def check_compare(out: str, err: str) -> None:
    assert "mean reward" in out and "positive fraction" in out and f"tiny/step-{STEPS}" in out, out
    assert Path("runs/compare/compare.json").exists()


def check_best_string(out: str, err: str) -> None:
    assert "texts scored; best sampled score" in out, out
    assert json.loads(Path("runs/best-string/best_string.json").read_text())["top"]


def check_trainer_status(out: str, err: str) -> None:
    status = json.loads(out)
    assert status["state"] == "finished" and status["step"] == status["total"] == STEPS, status


CHECKS = {
    "curl -s http://127.0.0.1:8000/v1/score": check_curl_score,
    "rlhf score": check_rlhf_score,
    "rlhf generate": check_generate,
    "rlhf compare": check_compare,
    "rlhf best-string": check_best_string,
    "curl -s http://127.0.0.1:8002/v1/status": check_trainer_status,
}


def printed_commands(lines: list[str]) -> list[list[str]]:
    """The commands `rlhf up` printed after training, as shell words."""
    start = next(i for i, line in enumerate(lines) if "Next commands to try" in line)
    return [shlex.split(line) for line in lines[start + 1:] if line.strip().startswith(("curl ", "rlhf "))]


def test_readme_commands_after_make_demo(tiny_kit, tmp_path, monkeypatch):
    commands = after_demo_commands()
    unchecked = [c for c in commands if not any(c.startswith(prefix) for prefix in CHECKS)]
    assert not unchecked, f"README commands this test does not know how to check: {unchecked}"
    require_free_default_ports()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLHF_TINY_DIR": str(Path(tiny_kit).resolve()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    monkeypatch.chdir(tmp_path)  # where `make demo` writes runs/, and where the commands run
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--preset", "tiny", "--keep-serving",
         "--set", f"train.total_steps={STEPS}", "--set", "train.eval_interval=2", "--set", "train.tensorboard=false"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    output = OutputReader(proc.stdout)
    try:
        output.wait_for("Ctrl-C stops", timeout=600)
        readme_words = [shlex.split(c, comments=True) for c in commands]
        printed = printed_commands(output.lines)
        assert len(printed) == 5, output.text  # curl, score, generate, compare, best-string
        for words in printed:  # what it prints is what the README shows
            if words[:2] != ["rlhf", "generate"]:  # that one names the run's checkpoint, the README says latest
                assert words in readme_words, f"rlhf up printed {shlex.join(words)!r}, not in the README block"
        for command in commands:
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            check = next(c for prefix, c in CHECKS.items() if command.startswith(prefix))
            check(done.stdout, done.stderr)
        pids = json.loads((tmp_path / "runs" / "logs" / "pids.json").read_text())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopping the services on SIGINT" in output.text
    assert set(pids) == {"reward", "generator", "trainer"}
    assert not [name for name, pid in pids.items() if alive(pid)]
