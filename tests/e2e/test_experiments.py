"""The study's experiments as commands and presets, checked by their numbers on the tiny kit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from services.reward.app import create_app as create_reward_app
from services.reward.settings import RewardSettings
from services.trainer.config import load_config
from services.trainer.run import train
from shared.clients import RewardClient
from shared.tiny.corpus import read_jsonl
from tests.conftest import ROOT
from tests.e2e.test_train_tiny import read_metrics

pytestmark = pytest.mark.slow


def rlhf(tiny_kit, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLHF_TINY_DIR": str(tiny_kit)}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("dataset", ["tiny", "CORPUS"])
def test_data_stats_counts_match_the_corpus(tiny_kit, dataset):
    dataset = str(tiny_kit / "corpus") if dataset == "CORPUS" else dataset
    out = rlhf(tiny_kit, "data", "stats", "--dataset", dataset, "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    for split, file in (("train", "train.jsonl"), ("heldout", "heldout.jsonl")):
        truth = Counter(r.label for r in read_jsonl(tiny_kit / "corpus" / file))
        assert stats[split]["labels"] == dict(truth) and stats[split]["total"] == sum(truth.values())
    table = rlhf(tiny_kit, "data", "stats", "--dataset", dataset)
    assert "positive" in table.stdout and "6000" in table.stdout


def test_data_prompts_are_three_to_five_words(tiny_kit, tmp_path):
    out_file = tmp_path / "prompts.jsonl"
    out = rlhf(tiny_kit, "data", "prompts", "--dataset", str(tiny_kit / "corpus"), "--words", "3-5", "--n", "200",
               "--seed", "4", "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    prompts = [json.loads(line)["prompt"] for line in out_file.read_text().splitlines()]
    assert len(prompts) == 200
    assert {len(p.split()) for p in prompts} == {3, 4, 5}
    again = tmp_path / "again.jsonl"
    rlhf(tiny_kit, "data", "prompts", "--dataset", "tiny", "--n", "200", "--seed", "4", "--out", str(again))
    assert again.read_text() == out_file.read_text()
    bad = rlhf(tiny_kit, "data", "prompts", "--dataset", "tiny", "--words", "5-3", "--out", str(again))
    assert bad.returncode == 2


def test_negative_preset_moves_the_reward_the_other_way(tiny_kit, tmp_path, serve):
    reward = serve(create_reward_app(RewardSettings(model=str(tiny_kit / "tiny-sentiment"), device="cpu", port=0)))
    config = load_config(ROOT / "configs" / "tiny-negative.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={tmp_path}", f"reward.url={reward.url}",
        "train.tensorboard=false", "train.total_steps=25", "data.eval_prompts=32"])
    assert config.reward.label == "NEGATIVE"
    status = train(config)
    assert status.state == "finished"
    evals = [m for m in read_metrics(config.run_dir) if "eval/reward_mean" in m]
    assert evals[-1]["eval/reward_mean"] >= evals[0]["eval/reward_mean"] + 0.25  # NEGATIVE probability rose
    # Scored for POSITIVE, the trained policy's text is now less positive than the base policy's.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_kit / "tiny-gpt2")
    prompts = json.loads((config.run_dir / "eval_prompts.json").read_text())[:32]

    def samples(path) -> list[str]:
        import torch

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=20, pad_token_id=tok.eos_token_id)
        return tok.batch_decode(out, skip_special_tokens=True)

    client = RewardClient(reward.url)
    base = sum(client.score(samples(tiny_kit / "tiny-gpt2"))) / len(prompts)
    trained = sum(client.score(samples(config.run_dir / "step-25"))) / len(prompts)
    assert trained < base - 0.2


def test_three_label_reward_model_trains_with_no_code_change(tiny_kit, tmp_path, serve):
    models = [{"name": "sentiment", "source": str(tiny_kit / "tiny-sentiment"), "label": "POSITIVE"},
              {"name": "three", "source": str(tiny_kit / "tiny-sentiment-3"), "label": "positive"}]
    reward = serve(create_reward_app(RewardSettings(models=models, device="cpu", port=0)))
    config = load_config(ROOT / "configs" / "tiny-3label.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={tmp_path}", f"reward.url={reward.url}",
        "train.tensorboard=false", "train.total_steps=25", "data.eval_prompts=32"])
    status = train(config)
    assert status.state == "finished"
    evals = [m for m in read_metrics(config.run_dir) if "eval/reward_mean" in m]
    assert evals[-1]["eval/reward_mean"] >= evals[0]["eval/reward_mean"] + 0.25
    assert max(e["eval/reward_mean"] for e in evals) >= 0.7


@pytest.fixture(scope="module")
def trained_system(tiny_kit, tmp_path_factory):
    """A reward service, a checkpoint trained toward POSITIVE for 20 iterations, and a generator serving it."""
    from services.generator.app import create_app as create_generator_app
    from services.generator.settings import GeneratorSettings
    from tests.conftest import ServerThread

    runs = tmp_path_factory.mktemp("runs")
    reward = ServerThread(create_reward_app(RewardSettings(model=str(tiny_kit / "tiny-sentiment"), device="cpu",
                                                           port=0))).start()
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={runs}", f"reward.url={reward.url}",
        "train.tensorboard=false", "train.total_steps=20", "data.eval_prompts=16"])
    train(config)
    generator = ServerThread(create_generator_app(GeneratorSettings(
        model=str(tiny_kit / "tiny-gpt2"), checkpoints=runs, device="cpu", port=0))).start()
    yield {"reward": reward, "generator": generator, "runs": runs}
    generator.stop()
    reward.stop()


def test_compare_reports_more_positive_text_after_positive_training(tiny_kit, trained_system, tmp_path):
    from services.trainer.experiments import compare, load_prompts
    from shared.clients import GeneratorClient

    with GeneratorClient(trained_system["generator"].url) as g, RewardClient(trained_system["reward"].url) as r:
        result = compare(g, r, "latest", load_prompts("neutral"), samples=4)
    assert result["checkpoint"] == "tiny/step-20"
    assert result["trained"]["positive_fraction"] > result["base"]["positive_fraction"]
    assert result["trained"]["mean_reward"] > result["base"]["mean_reward"] + 0.1
    assert len(result["examples"]) == len(load_prompts("neutral"))
    out = rlhf(tiny_kit, "compare", "--checkpoint", "tiny/step-20", "--prompts", "negative", "--samples", "2",
               "--generator", trained_system["generator"].url, "--reward", trained_system["reward"].url,
               "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "compare.json").read_text())
    assert "positive fraction" in out.stdout and (tmp_path / "compare.md").read_text().startswith("# base vs")
    assert written["prompts"] == 8 and written["samples_per_prompt"] == 2
    missing = rlhf(tiny_kit, "compare", "--checkpoint", "nope/step-1", "--generator", trained_system["generator"].url,
                   "--reward", trained_system["reward"].url, "--out", str(tmp_path))
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_best_string_beats_every_sampled_string(tiny_kit, trained_system, tmp_path):
    from services.trainer.experiments import best_string, load_prompts
    from shared.clients import GeneratorClient

    with GeneratorClient(trained_system["generator"].url) as g, RewardClient(trained_system["reward"].url) as r:
        result = best_string(g, r, "tiny/step-20", load_prompts("neutral"), budget=48)
        rescored = r.score([e["text"] for e in result["top"]])
    assert result["top"][0]["score"] >= result["best_sampled_score"]
    assert rescored == pytest.approx([e["score"] for e in result["top"]], abs=1e-5)
    assert all(e["text"].startswith(e["prompt"]) for e in result["top"])
    out = rlhf(tiny_kit, "best-string", "--checkpoint", "latest", "--budget", "24",
               "--checkpoints", str(trained_system["runs"]), "--generator", trained_system["generator"].url,
               "--reward", trained_system["reward"].url, "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    top = json.loads((tmp_path / "best_string.json").read_text())["top"]
    assert all(e["logprob"] < 0 for e in top)  # a log-probability under the trained policy
