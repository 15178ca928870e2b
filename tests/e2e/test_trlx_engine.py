"""train.engine=trlx for real: CarperAI/trlX (in its own environment, `make trlx-env`) runs the tiny preset against a
real reward service on loopback; metrics, checkpoints and stops as the native engine's.

Skipped unless the trlX environment exists (RLHF_TRLX_PYTHON, else .cache/trlx-env) or TRLX_SRC names a trlX
checkout or git URL to build it from (`make trlx-env TRLX_SRC=...`, a few minutes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from services.reward.app import create_app as create_reward_app
from services.reward.settings import RewardSettings
from services.trainer.config import load_config
from services.trainer.run import train
from services.trainer.tracking import TrainingStatus
from services.trainer.trlx_engine import TrlxConfigError, check_engine_environment, run_trlx, trlx_python
from shared.checkpoints import scan_checkpoints
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# What every native iteration record has (services/trainer/loop.py), without ppo/grad_norm (no clipping in trlX).
NATIVE_ITERATION_KEYS = {
    "rollout/reward_mean", "rollout/reward_std", "rollout/response_length", "rollout/empty_fraction", "objective/kl",
    "objective/kl_coef", "objective/entropy", "objective/rewards_total", "ppo/val/mean", "ppo/returns/mean",
    "ppo/val/explained_variance", "ppo/policy/loss", "ppo/val/loss", "ppo/policy/clipfrac", "ppo/val/clipfrac",
    "ppo/policy/approx_kl", "ppo/policy/ratio", "ppo/loss/total", "ppo/learning_rate", "time/generate", "time/score",
    "time/forward", "time/update", "time/iteration", "objective/kl_coef_next"}
NATIVE_EVAL_KEYS = {"eval/reward_mean", "eval/kl", "eval/response_length", "eval/empty_fraction",
                    "eval/positive_fraction"}


@pytest.fixture(scope="module")
def trlx_env() -> Path:
    python = trlx_python()
    if not python.exists():
        source = os.environ.get("TRLX_SRC")
        if not source or os.environ.get("RLHF_TRLX_PYTHON"):  # make builds .cache/trlx-env only
            pytest.skip(f"no trlX environment at {python}: build it with `make trlx-env TRLX_SRC=<trlX checkout or "
                        "git URL>`, or set TRLX_SRC for this test to build it")
        done = subprocess.run(["make", "trlx-env", f"TRLX_SRC={source}"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_engine_environment(python)  # an environment that exists must be a right one
    return python


@pytest.fixture
def reward(tiny_kit, serve):
    return serve(create_reward_app(RewardSettings(model=str(tiny_kit / "tiny-sentiment"), device="cpu", port=0)))


def trlx_tiny(kit: Path, runs: Path, url: str, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={kit / 'tiny-gpt2'}", f"train.checkpoint_dir={runs}", f"reward.url={url}",
        "train.tensorboard=false", "train.engine=trlx", "model.num_layers_unfrozen=2",
        "method.max_grad_norm=null", *overrides])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trlx_trains_the_tiny_preset_with_native_metrics_and_checkpoints(trlx_env, tiny_kit, tmp_path, reward):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = trlx_tiny(tiny_kit, tmp_path, reward.url, "train.total_steps=4", "train.eval_interval=2",
                       "train.checkpoint_interval=2")
    steps: list[int] = []
    status = train(config, on_step=lambda record: steps.append(record["step"]))  # train.engine=trlx dispatches
    assert status.state == "finished" and status.step == 4 and steps == [1, 2, 3, 4]
    assert status.last_checkpoint == "tiny/step-4" and status.eval_reward_mean is not None

    records = read_metrics(config.run_dir)
    rollouts = [r for r in records if "rollout/reward_mean" in r]
    evals = [r for r in records if "eval/reward_mean" in r]
    assert [r["step"] for r in rollouts] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    for r in rollouts:
        assert NATIVE_ITERATION_KEYS <= set(r), NATIVE_ITERATION_KEYS - set(r)
        assert r["ppo/optimizer_steps"] == r["step"] * config.optimizer_steps_per_iteration
        assert r["ppo/rollouts"] == config.method.num_rollouts
    for e in evals:
        assert NATIVE_EVAL_KEYS | {"trlx/eval/kl_reference"} <= set(e)
    # trlX's hydra reference is the starting policy: no KL before the first update, some after
    assert rollouts[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6) and evals[0]["eval/kl"] == pytest.approx(0.0,
                                                                                                            abs=1e-6)
    assert rollouts[-1]["objective/kl"] > 0 and rollouts[0]["ppo/learning_rate"] == pytest.approx(1e-4)
    assert 0.3 <= evals[0]["eval/reward_mean"] <= 0.7 and 15 <= evals[0]["eval/response_length"] <= 20
    assert json.dumps(status.history) == json.dumps(records)  # GET /v1/metrics serves the file's records

    found = {c.name: c for c in scan_checkpoints(tmp_path)}
    assert set(found) == {"tiny/step-2", "tiny/step-4"} and all(c.valid for c in found.values())
    manifest = json.loads((config.run_dir / "step-4" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["config"]["train"]["engine"] == "trlx"
    assert {"eval/reward_mean", "rollout/reward_mean", "objective/kl"} <= set(manifest["metrics"])
    assert json.loads((config.run_dir / "best.json").read_text())["metric"] == "eval/reward_mean"
    assert not (config.run_dir / ".trlx" / "model").exists()  # the handoff copies are gone; spec and log stay

    # Loaded the generator's way (transformers 5): the trained weights, not a re-initialised model, and the tokenizer
    # the policy had.
    step4 = found["tiny/step-4"].path
    state = json.loads((step4 / "trlx_state.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(step4).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(state["probe"]["input_ids"])).logits[..., :8]
    assert torch.allclose(logits, torch.tensor(state["probe"]["logits_first8"]), atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_kit / "tiny-gpt2").eval()
    with torch.no_grad():
        base_logits = base(input_ids=torch.tensor(state["probe"]["input_ids"])).logits[..., :8]
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # it did train
    text = "I watched this movie and"
    assert AutoTokenizer.from_pretrained(step4)(text).input_ids == \
        AutoTokenizer.from_pretrained(tiny_kit / "tiny-gpt2")(text).input_ids

    # The config trlX ran is exactly trlX's TRLConfig (from_dict -> to_dict round trip, in the trlX environment).
    spec = config.run_dir / ".trlx" / "spec.json"
    check = ("import json, sys; from trlx.data.configs import TRLConfig; d = json.load(open(sys.argv[1]))"
             "['trlx_config']; c = TRLConfig.from_dict(json.loads(json.dumps(d))); "
             "assert json.loads(json.dumps(c.to_dict())) == d, c.to_dict(); print('same')")
    done = subprocess.run([str(trlx_env), "-c", check, str(spec)], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip().endswith("same"), done.stderr[-2000:]


def test_a_stop_mid_run_saves_the_iterations_done(trlx_env, tiny_kit, tmp_path, reward):
    config = trlx_tiny(tiny_kit, tmp_path, reward.url, "train.total_steps=8", "train.eval_interval=100",
                       "train.checkpoint_interval=100")
    status = TrainingStatus(total=8)

    def on_step(record: dict) -> None:
        if record["step"] == 2:
            status.stop_requested.set()  # as POST /v1/stop, a shutdown or Ctrl-C under `rlhf up` do

    run_trlx(config, None, None, status, on_step=on_step)
    assert status.state == "stopped"
    done = [r["step"] for r in read_metrics(config.run_dir) if "rollout/reward_mean" in r]
    assert 2 <= done[-1] < 8 and done == list(range(1, done[-1] + 1))
    found = [c for c in scan_checkpoints(tmp_path) if c.run == "tiny"]
    assert [c.step for c in found] == [done[-1]] and found[0].valid  # the last iteration done, saved on the way out
    assert status.last_checkpoint == f"tiny/step-{done[-1]}" and status.step == done[-1]


def test_a_run_folder_with_checkpoints_is_not_resumed_silently(trlx_env, tiny_kit, tmp_path, reward):
    config = trlx_tiny(tiny_kit, tmp_path, reward.url, "train.total_steps=1")
    run_trlx(config, None, None, TrainingStatus(total=1))
    assert [c.step for c in scan_checkpoints(tmp_path)] == [1]
    again = trlx_tiny(tiny_kit, tmp_path, reward.url, "train.total_steps=1", "train.resume=true")
    with pytest.raises(TrlxConfigError, match="cannot resume .*train.resume=false"):
        run_trlx(again, None, None, TrainingStatus(total=1))
