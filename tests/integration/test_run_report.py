"""The end-of-run report through real generator and reward services on loopback: it names the checkpoint its examples
use and why, its summary agrees, and both plots are written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.generator.app import create_app as create_generator_app
from services.generator.settings import GeneratorSettings
from services.reward.app import create_app as create_reward_app
from services.reward.settings import RewardSettings
from services.trainer.config import load_config
from services.trainer.report import write_report
from services.trainer.run import train
from shared.checkpoints import atomic_write_text
from shared.clients import GeneratorClient, RewardClient
from tests.conftest import ROOT, ServerThread

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["train.tensorboard=false", "train.checkpoint_interval=2", "train.eval_interval=2", "data.eval_prompts=4",
        "method.num_rollouts=16", "method.chunk_size=16", "method.ppo_epochs=1", "method.gen_kwargs.max_new_tokens=8",
        "train.mixed_precision=no", "train.total_steps=4"]


@pytest.fixture(scope="module")
def services(tiny_kit, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    reward = ServerThread(create_reward_app(RewardSettings(model=str(tiny_kit / "tiny-sentiment"), device="cpu",
                                                           port=0, torch_threads=1))).start()
    generator = ServerThread(create_generator_app(GeneratorSettings(
        model=str(tiny_kit / "tiny-gpt2"), checkpoints=runs, port=0, device="cpu", torch_threads=1))).start()
    yield runs, reward.url, generator.url
    generator.stop()
    reward.stop()


@pytest.fixture(scope="module")
def run(tiny_kit, services) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4, evaluations at 0, 2 and 4) whose end wrote the report."""
    runs, reward_url, generator_url = services
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={runs}", f"reward.url={reward_url}",
        f"generator.url={generator_url}", *FAST])
    assert train(config).state == "finished"
    return config.run_dir


def eval_rewards(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/reward_mean"] for r in records if "eval/reward_mean" in r}


def point_best_at(run_dir: Path, step: int) -> None:
    """best.json as the trainer writes it when step `step`'s evaluation is the best."""
    value = eval_rewards(run_dir)[step]
    atomic_write_text(run_dir / "best.json", json.dumps({"checkpoint": f"tiny/step-{step}",
                                                         "metric": "eval/reward_mean", "value": value}))


def report(run_dir: Path, services) -> str:
    _, reward_url, generator_url = services
    for name in ("report.md", "report.png", "report_reward_kl.png"):
        (run_dir / name).unlink(missing_ok=True)
    with RewardClient(reward_url) as reward, GeneratorClient(generator_url) as generator:
        write_report(run_dir, reward, generator)
    for name in ("report.png", "report_reward_kl.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG
    return (run_dir / "report.md").read_text()


def summary_header(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("| | before"))


def test_the_report_a_run_ends_with_names_its_examples_checkpoint_as_best_json_says(run):
    text = (run / "report.md").read_text()
    best = json.loads((run / "best.json").read_text())["checkpoint"]
    assert re.search(rf"Examples use `{best}`: (the best eval reward|the last checkpoint, which is also the best)",
                     text)
    assert "![eval reward against eval KL, by step](report_reward_kl.png)" in text
    for name in ("report.png", "report_reward_kl.png"):
        assert (run / name).read_bytes()[:8] == PNG


def test_a_best_before_the_last_checkpoint_is_used_and_the_last_shown_beside_it(run, services):
    point_best_at(run, 2)
    rewards = eval_rewards(run)
    text = report(run, services)
    assert (f"Examples use `tiny/step-2`: the best eval reward ({rewards[2]:.3f} at step 2). The last checkpoint is "
            f"`tiny/step-4` (eval reward {rewards[4]:.3f}).") in text
    assert summary_header(text) == "| | before (step 0) | examples: `tiny/step-2` (step 2) | last: `tiny/step-4` " \
                                   "(step 4) |"
    assert f"| eval reward (mean) | {rewards[0]:.3f} | {rewards[2]:.3f} | {rewards[4]:.3f} |" in text
    assert "the trained ones from `tiny/step-2`" in text


def test_a_last_checkpoint_that_is_the_best_is_said_to_be_both(run, services):
    point_best_at(run, 4)
    rewards = eval_rewards(run)
    text = report(run, services)
    assert (f"Examples use `tiny/step-4`: the last checkpoint, which is also the best (eval reward "
            f"{rewards[4]:.3f} at step 4).") in text
    assert summary_header(text) == "| | before (step 0) | examples: `tiny/step-4` (step 4) |"
    assert f"| eval reward (mean) | {rewards[0]:.3f} | {rewards[4]:.3f} |" in text
