"""The trainer as two processes under `accelerate launch` (CPU, gloo) on the tiny preset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import ROOT
from tests.e2e.test_train_tiny import reward_app, rollout_steps

pytestmark = pytest.mark.slow


def texts_scored(url: str) -> float:
    metrics = httpx.get(url + "/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(r"^reward_texts_total\{[^}]*\} (\S+)$", metrics, re.M))


def test_two_processes_train_together(tiny_kit, tmp_path, serve):
    reward = serve(reward_app(tiny_kit))
    accelerate = Path(sys.executable).parent / "accelerate"
    # accelerate's multi-process launcher; with no GPU visible each process runs on the CPU and syncs over gloo.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "services.cli", "train", "--config",
           str(ROOT / "configs" / "tiny.yaml"), "--set", f"model.model_path={tiny_kit / 'tiny-gpt2'}",
           "--set", f"train.checkpoint_dir={tmp_path}", "--set", f"reward.url={reward.url}",
           "--set", "train.total_steps=3", "--set", "train.checkpoint_interval=3", "--set", "train.eval_interval=100",
           "--set", "data.eval_prompts=8", "--set", "train.tensorboard=false"]
    before = texts_scored(reward.url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "tiny"
    assert rollout_steps(run) == [1, 2, 3]  # one metrics line per step: only the main process logs
    state = torch.load(run / "step-3" / "trainer_state.pt", weights_only=False)
    assert len(state["ranks"]) == 2  # both processes' data position and RNG are in the checkpoint
    assert state["ranks"][0]["sampler"] != state["ranks"][1]["sampler"] or \
        not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    # Each process scored its own 64 rollouts per step; the main process alone scored 8 x 2 eval samples at the
    # start and at the end.
    assert texts_scored(reward.url) - before == 3 * 2 * 64 + 2 * 16
