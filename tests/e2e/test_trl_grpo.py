"""TRL 1.x's own trainers against a real `rlhf reward serve` on loopback, through shared.frameworks.trl.

TRL 1.x cannot share this project's .venv (which keeps trl 0.11.4), so the trainers run as a script in the framework
environment that `make trl-env` builds (.cache/trl-env; RLHF_TRL_PYTHON points at another one). The test builds it
when it is missing, so `make test` and CI exercise it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.readiness import wait_until_ready
from tests.conftest import ROOT, framework_python, free_port

# The first test may build the environment (about 1.5 minutes here) before it runs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCRIPT = r'''
"""GRPO (and RLOO, online DPO) on the tiny GPT-2 with the reward service as the reward, one torch thread."""
import argparse, json, math, random, sys, time

import torch

torch.set_num_threads(1)
import trl
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.trainer.utils import get_callable_name, is_async_callable

from shared.frameworks.trl import AsyncRemoteReward, RemoteReward

p = argparse.ArgumentParser()
for name in ("mode", "model", "corpus", "url", "out", "workdir"):
    p.add_argument("--" + name, required=True)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

rng = random.Random(a.seed)
texts = [json.loads(line)["text"] for line in open(a.corpus)]
rng.shuffle(texts)
PROMPTS = [" ".join(t.split()[: rng.randint(3, 5)]) for t in texts[:512]]  # the tiny preset's prompts
COMMON = dict(output_dir=a.workdir, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
              seed=a.seed, bf16=False, disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0,
              dataloader_num_workers=0)


def history(trainer, name):
    return [{k: v for k, v in h.items() if k in ("step", "reward", f"rewards/{name}/mean")}
            for h in trainer.state.log_history if f"rewards/{name}/mean" in h]


out = {"trl": trl.__version__}
if a.mode == "grpo":
    # 32 completions a step: 4 prompts x 8 generations, 16 new tokens; no KL (TRL's default beta=0).
    reward = RemoteReward(a.url, label="POSITIVE")
    config = GRPOConfig(per_device_train_batch_size=32, num_generations=8, max_completion_length=16,
                        learning_rate=a.lr, max_steps=a.steps, **COMMON)
    trainer = GRPOTrainer(model=a.model, reward_funcs=[reward], args=config,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    started = time.monotonic()
    trainer.train()
    out.update(name=get_callable_name(reward), names=trainer.reward_func_names, is_async=is_async_callable(reward),
               history=history(trainer, trainer.reward_func_names[0]), train_s=time.monotonic() - started)
else:
    calls = []

    class Recorded(AsyncRemoteReward):
        """The async reward, noting what TRL hands it."""

        async def __call__(self, prompts=None, completions=(), **kwargs):
            scores = await super().__call__(prompts=prompts, completions=completions, **kwargs)
            calls.append({"n": len(completions), "kwargs": sorted(kwargs), "prompt": prompts[0],
                          "completion": completions[0], "text": self.texts(prompts[:1], completions[:1])[0],
                          "scores": scores})
            return scores

    # GRPO on conversations with the async reward (awaited on TRL's daemon event loop).
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}"
                               "{% endfor %}{% if add_generation_prompt %} {% endif %}")
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:64]],
                              "topic": ["films"] * 64})
    reward = Recorded(a.url, label="POSITIVE", name="sentiment")
    trainer = GRPOTrainer(model=a.model, processing_class=tokenizer, reward_funcs=[reward], train_dataset=chat,
                          args=GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                                          max_steps=2, **COMMON))
    trainer.train()
    out["grpo_async"] = {"names": trainer.reward_func_names, "has_async": trainer._has_async_funcs,
                         "history": history(trainer, "sentiment"), "calls": calls}

    # RLOO with the sync reward
    trainer = RLOOTrainer(model=a.model, reward_funcs=[RemoteReward(a.url, label="POSITIVE")],
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS[:64]}),
                          args=RLOOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                                          max_steps=2, **COMMON))
    trainer.train()
    out["rloo"] = {"names": trainer.reward_func_names, "history": history(trainer, "reward_service_POSITIVE")}

    # Online DPO (experimental in TRL 1.x): synchronous reward functions only
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    trainer = OnlineDPOTrainer(model=a.model, processing_class=AutoTokenizer.from_pretrained(a.model),
                               reward_funcs=[RemoteReward(a.url, label="POSITIVE")],
                               train_dataset=Dataset.from_dict({"prompt": PROMPTS[:64]}),
                               args=OnlineDPOConfig(per_device_train_batch_size=4, max_new_tokens=8, max_steps=2,
                                                    **COMMON))
    trainer.train()
    out["online_dpo"] = {"names": trainer.reward_func_names,
                         "log": [{k: v for k, v in h.items() if k.startswith(("objective/scores", "rewards/"))}
                                 for h in trainer.state.log_history]}
json.dump(out, open(a.out, "w"))
'''


@pytest.fixture(scope="module")
def reward_service(tiny_kit, tmp_path_factory):
    """A real `rlhf reward serve` process on loopback, scoring with the tiny sentiment classifier."""
    port = free_port()
    log = tmp_path_factory.mktemp("reward") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "reward", "serve", "--model",
                                 str(tiny_kit / "tiny-sentiment"), "--port", str(port), "--log-level", "warning"],
                                cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def alive() -> None:
            assert proc.poll() is None, f"reward service exited:\n{log.read_text()[-3000:]}"

        wait_until_ready(url, 90, alive=alive, max_delay=0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_script(mode: str, url: str, kit: Path, tmp_path: Path, *args: str, timeout: float = 300) -> dict:
    python = framework_python()
    script, out = tmp_path / "trl_script.py", tmp_path / f"{mode}.json"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    kit = kit.resolve()
    done = subprocess.run([str(python), str(script), "--mode", mode, "--model", str(kit / "tiny-gpt2"),
                           "--corpus", str(kit / "corpus" / "train.jsonl"), "--url", url, "--out", str(out),
                           "--workdir", str(tmp_path / "work"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def test_grpo_trainer_learns_from_the_reward_service(reward_service, tiny_kit, tmp_path):
    got = run_script("grpo", reward_service, tiny_kit, tmp_path, "--steps", "30")
    assert got["trl"].startswith("1.16.")
    assert got["name"] == "reward_service_POSITIVE" == got["names"][0] and not got["is_async"]
    rewards = [h["reward"] for h in got["history"]]
    assert len(rewards) == 30 and all(math.isfinite(r) for r in rewards)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # The tiny policy starts near 0.5 (its prompts are half positive); a few steps of GRPO make it write praise.
    assert 0.3 <= first <= 0.7, rewards
    assert last >= first + 0.2 and last >= 0.75, rewards


def test_trl_trainers_call_remote_reward_their_way(reward_service, tiny_kit, tmp_path):
    got = run_script("trainers", reward_service, tiny_kit, tmp_path)
    grpo = got["grpo_async"]
    assert grpo["names"] == ["sentiment"] and grpo["has_async"]  # TRL saw the async __call__ and awaited it
    assert len(grpo["history"]) == 2 and all(0 <= h["rewards/sentiment/mean"] <= 1 for h in grpo["history"])
    call = grpo["calls"][0]
    assert call["n"] == 8
    assert {"completion_ids", "trainer_state", "log_extra", "log_metric", "topic"} <= set(call["kwargs"])
    assert call["prompt"][-1]["role"] == "user" and call["completion"][0]["role"] == "assistant"
    user, reply = call["prompt"][-1]["content"], call["completion"][-1]["content"]
    assert call["text"] == (f"{user}\n{reply}" if reply else "")
    assert all(s is None or 0 <= s <= 1 for s in call["scores"])
    rloo = got["rloo"]
    assert rloo["names"] == ["reward_service_POSITIVE"] and len(rloo["history"]) == 2
    assert all(0 <= h["rewards/reward_service_POSITIVE/mean"] <= 1 for h in rloo["history"])
    dpo = got["online_dpo"]
    assert dpo["names"] == ["reward_service_POSITIVE"]
    scores = [h["objective/scores"] for h in dpo["log"] if "objective/scores" in h]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores), dpo["log"]  # the mean of the service's scores
