"""Running a job again on its run folder: a finished run says so and trains nothing, a longer total_steps resumes it,
a config that no longer fits its checkpoints is refused naming the keys, and a fresh start keeps the old run aside.
The tiny preset with an in-process reward, and `rlhf train` as a real subprocess."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.reward.app import create_app as create_reward_app
from services.reward.settings import RewardSettings
from services.trainer.checkpointing import TRAINER_STATE
from services.trainer.config import load_config
from services.trainer.preflight import ResumeConflict, RunFinished, check_run
from services.trainer.run import train
from services.trainer.tracking import TrainingStatus
from shared.checkpoints import write_checkpoint
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

FAST = ["train.tensorboard=false", "train.checkpoint_interval=2", "train.eval_interval=2", "data.eval_prompts=4",
        "method.num_rollouts=16", "method.chunk_size=16", "method.ppo_epochs=1", "method.gen_kwargs.max_new_tokens=8",
        "train.mixed_precision=no"]


def settings(kit: Path, runs: Path, *overrides: str) -> list[str]:
    return [f"model.model_path={kit / 'tiny-gpt2'}", f"train.checkpoint_dir={runs}", *FAST, *overrides]


def tiny(kit: Path, runs: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", settings(kit, runs, *overrides))


def length_reward(samples, prompts, outputs, **kw):
    return [min(len(o), 30) / 30 for o in outputs]


def rollout_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "rollout/reward_mean" in r]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time: equal snapshots, untouched files."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("step-*"))


@pytest.fixture(scope="module")
def finished(tiny_kit, tmp_path_factory) -> Path:
    """A finished run of 4 steps: step-2 and step-4 committed, evaluations at steps 0, 2 and 4."""
    runs = tmp_path_factory.mktemp("finished")
    status = train(tiny(tiny_kit, runs, "train.total_steps=4"), reward_fn=length_reward)
    assert status.state == "finished" and status.step == 4
    return runs


@pytest.fixture
def runs(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "runs")
    return tmp_path / "runs"


def test_rerunning_a_finished_run_says_so_and_trains_nothing(tiny_kit, runs, caplog):
    before = snapshot(runs)
    scored: list[int] = []

    def reward(samples, prompts, outputs, **kw):
        scored.append(len(outputs))
        return [0.0] * len(outputs)

    # eval_interval changed too: a setting a resume may change, so the run is finished, not in conflict
    config = tiny(tiny_kit, runs, "train.total_steps=4", "train.eval_interval=1")
    with caplog.at_level(logging.WARNING, logger="services.trainer.run"):
        status = train(config, reward_fn=reward)
    best = json.loads((runs / "tiny" / "best.json").read_text())["checkpoint"]
    assert status.state == "finished" and status.error is None and status.step == 4
    assert status.message == (
        f"run 'tiny' already finished: step 4/4 in {runs / 'tiny'} (best: {best}). To train it again from scratch "
        "add --fresh (`--set train.resume=false`; the old run folder is kept aside); to keep it and start another "
        "run, pass --run-name NAME (`--set train.run_name=NAME`). To train it further, raise train.total_steps.")
    assert status.last_checkpoint == "tiny/step-4" and status.best_checkpoint == best
    assert any(r.levelname == "WARNING" and r.getMessage() == status.message for r in caplog.records)
    assert scored == [] and snapshot(runs) == before  # nothing generated, scored or written


def test_raising_total_steps_resumes_the_finished_run(tiny_kit, runs):
    status = train(tiny(tiny_kit, runs, "train.total_steps=6"), reward_fn=length_reward)
    assert status.state == "finished" and status.start_step == 4 and status.step == 6
    assert rollout_steps(runs / "tiny") == [1, 2, 3, 4, 5, 6]
    assert steps(runs / "tiny") == ["step-2", "step-4", "step-6"]


@pytest.mark.parametrize("change, listed", [
    ("model.model_path={other}", "model.model_path: '{kit}/tiny-gpt2' -> '{other}'"),
    ("optimizer.kwargs.lr=0.001", "optimizer.kwargs.lr: 0.0001 -> 0.001"),
    ("model.num_layers_unfrozen=1", "model.num_layers_unfrozen: -1 -> 1"),
])
def test_a_config_change_that_breaks_resume_is_refused_naming_each_key(tiny_kit, runs, tmp_path, change, listed):
    other = tmp_path / "other-gpt2"
    shutil.copytree(tiny_kit / "tiny-sentiment", other)  # another model that exists: only the refusal stops it
    before = snapshot(runs)
    config = tiny(tiny_kit, runs, "train.total_steps=6", "train.eval_interval=1", "reward.url=http://10.9.9.9:1",
                  change.format(other=other))
    status = TrainingStatus(total=6)
    with pytest.raises(ResumeConflict) as refused:
        train(config, reward_fn=length_reward, status=status)
    message = str(refused.value)
    assert message.startswith(f"run 'tiny' cannot resume from tiny/step-4 in {runs / 'tiny'}")
    assert listed.format(kit=tiny_kit, other=other) in message
    assert "eval_interval" not in message and "reward" not in message and "total_steps:" not in message
    assert "--fresh" in message and "train.run_name=NAME" in message
    assert status.state == "failed" and status.error == message
    assert snapshot(runs) == before


def test_fresh_starts_over_from_step_0_and_keeps_the_old_run_aside(tiny_kit, runs, caplog):
    old = snapshot(runs / "tiny")
    with caplog.at_level(logging.WARNING, logger="services.trainer.checkpointing"):
        status = train(tiny(tiny_kit, runs, "train.total_steps=2", "train.resume=false"), reward_fn=length_reward)
    assert status.state == "finished" and status.start_step == 0 and status.step == 2
    aside = [p for p in runs.iterdir() if p.name != "tiny"]
    assert len(aside) == 1 and re.fullmatch(r"tiny\.replaced-\d{8}T\d{6}Z", aside[0].name)
    assert snapshot(aside[0]) == old  # every file of the old run, untouched
    assert any(str(aside[0]) in r.getMessage() for r in caplog.records)
    assert rollout_steps(runs / "tiny") == [1, 2] and steps(runs / "tiny") == ["step-2"]
    assert json.loads((runs / "tiny" / "best.json").read_text())["checkpoint"] == "tiny/step-2"


def commit(kit: Path, config, step: int, trainer_state: bytes | None = None) -> None:
    """A complete checkpoint of `config`'s run (the tiny policy as is), with these bytes as its trainer state."""

    def save(tmp: Path) -> None:
        shutil.copytree(kit / "tiny-gpt2", tmp, dirs_exist_ok=True)
        if trainer_state is not None:
            (tmp / TRAINER_STATE).write_bytes(trainer_state)

    write_checkpoint(config.train.checkpoint_dir, config.train.run_name, step, save,
                     config=config.model_dump(mode="json"))


def test_a_finished_trlx_engine_run_counts_as_finished_without_a_trainer_state(tiny_kit, tmp_path):
    trlx = tiny(tiny_kit, tmp_path, "train.total_steps=3", "train.engine=trlx")
    commit(tiny_kit, trlx, 3)  # as the trlX engine saves: weights, no trainer state (it cannot resume)
    with pytest.raises(RunFinished, match=r"^run 'tiny' already finished: step 3/3"):
        check_run(trlx)
    with pytest.raises(ResumeConflict, match=r"train\.engine: 'trlx' -> 'native'"):
        check_run(tiny(tiny_kit, tmp_path, "train.total_steps=3"))


def test_a_native_checkpoint_whose_trainer_state_is_garbage_does_not_finish_the_run(tiny_kit, tmp_path):
    native = tiny(tiny_kit, tmp_path, "train.total_steps=3")
    commit(tiny_kit, native, 3, trainer_state=b"\0garbage" * 100)
    check_run(native)  # no refusal: the resume skips that checkpoint and says so (tests/reliability)


def rlhf_train(kit: Path, runs: Path, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "services.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"), *flags]
    for item in settings(kit, runs, *overrides):
        argv += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLHF_TINY_DIR": str(kit)}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_rlhf_train_says_a_run_finished_with_exit_0_and_refuses_a_conflict_with_exit_2(tiny_kit, runs):
    before = snapshot(runs)
    done = rlhf_train(tiny_kit, runs, "train.total_steps=4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("run 'tiny' already finished: step 4/4") and "Traceback" not in done.stderr
    refused = rlhf_train(tiny_kit, runs, "train.total_steps=6", "model.revision=main")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.startswith("error: run 'tiny' cannot resume from tiny/step-4")
    assert "model.revision: None -> 'main'" in refused.stderr and "Traceback" not in refused.stderr
    assert snapshot(runs) == before


def test_rlhf_train_fresh_trains_from_step_0_beside_the_old_run(tiny_kit, runs, serve):
    reward = serve(create_reward_app(RewardSettings(model=str(tiny_kit / "tiny-sentiment"), device="cpu", port=0)))
    done = rlhf_train(tiny_kit, runs, "train.total_steps=2", f"reward.url={reward.url}", flags=("--fresh",))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("finished: step 2/2")
    assert [p.name.split("-")[0] for p in runs.glob("tiny.replaced-*")] == ["tiny.replaced"]
    assert rollout_steps(runs / "tiny") == [1, 2] and steps(runs / "tiny") == ["step-2"]
