"""shared/settings.py (YAML + flags + environment -> settings, or one error line), shared/logs.py and
shared/tiny/kit.py (where the tiny kit is and whether it is built)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from services.generator.settings import GeneratorSettings
from services.reward.settings import RewardSettings
from shared.logs import setup_logging
from shared.settings import describe, load_settings, or_exit
from shared.tiny import kit
from tests.conftest import ROOT


def test_flags_beat_the_file_which_beats_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("REWARD_PORT", "9001")
    monkeypatch.setenv("REWARD_TORCH_THREADS", "3")
    monkeypatch.setenv("REWARD_EXIT_ON_LOAD_FAILURE", "false")
    config = tmp_path / "reward.yaml"
    config.write_text("model: /m\nport: 9002\nbatching: {max_batch_size: 8, max_wait_ms: 5}\n")
    s = load_settings(RewardSettings, config, {"port": 9003, "label": None,
                                               "batching": {"max_batch_size": 2, "max_wait_ms": None}}, "x")
    assert (s.port, s.torch_threads, s.label) == (9003, 3, None)
    assert (s.batching.max_batch_size, s.batching.max_wait_ms) == (2, 5)  # nested flags merge into the file's
    assert s.exit_on_load_failure is False
    assert load_settings(GeneratorSettings, None, {"model": "/g"}, "x").exit_on_load_failure is True


@pytest.mark.parametrize("config, flags, message", [
    (None, {}, "error: invalid reward service settings: no reward model configured"),
    (None, {"model": "/m", "port": 70000}, "error: invalid reward service settings: port: Input should be less"),
    ("missing.yaml", {"model": "/m"}, "error: invalid reward service settings: config file "),
])
def test_invalid_settings_are_one_error_line_and_exit_code_2(tmp_path, capsys, config, flags, message):
    with pytest.raises(SystemExit) as exited:
        load_settings(RewardSettings, tmp_path / config if config else None, flags, "reward service settings")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_describe_lists_every_problem_on_one_line():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        GeneratorSettings(model="/g", port=-1, torch_threads=0)
    assert describe(caught.value) == ("port: Input should be greater than or equal to 0; "
                                      "torch_threads: Input should be greater than or equal to 1")
    assert describe(ValueError("bad\n  value")) == "bad value"


def test_or_exit_passes_other_errors_through():
    with pytest.raises(KeyError):
        or_exit("x", lambda: {}["missing"])
    assert or_exit("x", lambda: 42) == 42


def test_setup_logging_one_format_and_quiet_httpx():
    code = ("import logging; from shared.logs import setup_logging; setup_logging('debug'); "
            "logging.getLogger('a.b').info('hello'); logging.getLogger('httpx').info('per request')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.rstrip().endswith(" INFO a.b: hello") and "per request" not in done.stderr
    setup_logging("info")  # in this process: only the httpx level is observable (basicConfig runs once)
    assert logging.getLogger("httpx").level == logging.WARNING


def test_kit_dir_is_the_environment_or_one_default(monkeypatch):
    monkeypatch.setenv("RLHF_TINY_DIR", "/kits/tiny")
    assert kit.kit_dir() == Path("/kits/tiny")
    monkeypatch.delenv("RLHF_TINY_DIR")
    assert kit.kit_dir() == Path(".cache/tiny")
    kit.use(Path("/elsewhere"))
    assert kit.kit_dir() == Path("/elsewhere")


def test_ensure_built_builds_only_an_incomplete_kit(tmp_path, monkeypatch):
    built, said = [], []
    monkeypatch.setattr("shared.tiny.build.build_tiny", lambda out, **kw: built.append(out))
    target = tmp_path / "kit"
    monkeypatch.setenv("RLHF_TINY_DIR", str(target))
    assert kit.ensure_built(echo=said.append) == target and built == [target]
    assert "building the tiny kit in" in said[0] and not kit.is_built(target)
    target.mkdir()
    (target / "report.json").write_text("{}")  # the build writes it last
    assert kit.is_built(target)
    kit.ensure_built(target, echo=said.append)
    assert built == [target]  # complete: reused
    kit.ensure_built(target, echo=said.append, needed=("tiny-gpt2",))
    assert built == [target, target]  # an artefact added since: built again (the build reuses the rest)
