"""`rlhf up` fails fast and says why: a model that cannot load ends it with the service's own reason; bad input
ends it with one message and exit code 2 before anything starts."""

from __future__ import annotations

import socket

import pytest

from tests.e2e.test_up import alive, launch, service_pids

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("flag", "model", "service", "reason"), [
    ("--reward-model", "/nonexistent", "reward", "model folder '/nonexistent' does not exist"),
    ("--policy-model", "no-such/model", "generator", "cannot load 'no-such/model'"),  # a hub id, and no hub
])
def test_a_model_that_cannot_load_ends_the_launch_with_the_services_reason(tiny_kit, tmp_path, flag, model, service,
                                                                           reason):
    proc, logs, _ = launch(tiny_kit, tmp_path, extra=[flag, model])
    pids = service_pids(logs, names=("reward", "generator"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert f"the {service} service could not start" in err and model in err
    assert reason in err  # the service's own words, from its log
    assert "trainer" not in service_pids(logs, names=("reward", "generator"))  # training never started
    assert not [name for name, pid in pids.items() if alive(pid)]


def test_a_service_that_stays_up_unready_is_read_from_its_readyz(tiny_kit, tmp_path):
    """A reward service told not to exit on a failed load says so on /readyz: the launcher stops at once too."""
    proc, logs, _ = launch(tiny_kit, tmp_path, extra=["--reward-model", "/nonexistent"],
                           REWARD_EXIT_ON_LOAD_FAILURE="false")
    pids = service_pids(logs, names=("reward", "generator"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert "the reward service could not load /nonexistent" in err
    assert "model folder '/nonexistent' does not exist" in err
    assert not [name for name, pid in pids.items() if alive(pid)]  # the unready service was stopped too


@pytest.mark.parametrize(("sets", "expected"), [
    (["train.total_steps=0"], ["error: invalid config: train.total_steps: Input should be greater than or equal to 1"]),
    (["train.total_steps=0", "method.cliprange=-1", "train.no_such_key=1"],
     ["train.total_steps: Input should be greater than or equal to 1", "method.cliprange: Input should be greater",
      "train.no_such_key: Extra inputs are not permitted"]),
    (["train.total_steps"], ["error: invalid config: --set takes key=value, got 'train.total_steps'"]),
])
def test_a_bad_set_is_one_message_and_exit_2_with_nothing_started(tiny_kit, tmp_path, sets, expected):
    proc, logs, _ = launch(tiny_kit, tmp_path, *sets)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    assert err.count("error:") == 1 and "Traceback" not in out + err
    for text in expected:
        assert text in err
    assert not logs.exists() and not (tmp_path / "runs").exists()  # no service started, no run folder made


def test_an_unknown_preset_or_a_busy_port_is_exit_2(tiny_kit, tmp_path):
    proc, logs, _ = launch(tiny_kit, tmp_path, extra=["--preset", "nope"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: unknown preset 'nope'; choose tiny or imdb" in err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, logs, _ = launch(tiny_kit, tmp_path, extra=["--reward-port", str(port)])
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and f"port {port} (the reward service's) is in use" in err
    assert "Traceback" not in out + err and not logs.exists()
