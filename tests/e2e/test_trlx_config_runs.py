"""A trlX script's config file and reward_fn run here unchanged (README: Coming from trlX): the file as trlX writes it
(`yaml.safe_dump(TRLConfig.to_dict())`), a trlX-style Python `reward_fn`, prompts in Python; training happens in the
translated units, with trlX's semantics for frozen layers."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from services.trainer.config import load_config
from services.trainer.run import train

pytestmark = pytest.mark.slow

PROMPTS = ["I watched The", "The story follows a", "This comedy", "We went to see The", "I saw The Quiet",
           "The film The Golden", "In The Silent Mirror,", "My review of"]


def trlx_file(kit, runs) -> dict:
    """trlX's `default_ppo_config().to_dict()` with the tiny kit's model and sizes a 2-core machine trains in
    seconds: 16 rollouts, minibatches of 8, 2 PPO epochs -> 4 optimizer steps a PPO iteration."""
    return {
        "method": {"name": "PPOConfig", "ppo_epochs": 2, "num_rollouts": 16, "chunk_size": 16, "init_kl_coef": 0.001,
                   "target": None, "horizon": 10000, "gamma": 1, "lam": 0.95, "cliprange": 0.2,
                   "cliprange_value": 0.2, "vf_coef": 1, "scale_reward": "ignored", "ref_mean": None,
                   "ref_std": None, "cliprange_reward": 10,
                   "gen_kwargs": {"max_new_tokens": 8, "top_k": 0, "top_p": 1.0, "do_sample": True},
                   "gen_experience_kwargs": None, "num_value_layers_unfrozen": 0},
        "model": {"model_path": str(kit / "tiny-gpt2"), "model_arch_type": "causal", "num_layers_unfrozen": 1,
                  "peft_config": None, "model_extra_configs": {}},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 1e-6}},
        "scheduler": {"name": "cosine_annealing", "kwargs": {"T_max": 1e12, "eta_min": 1e-4}},
        "tokenizer": {"tokenizer_path": str(kit / "tiny-gpt2"), "padding_side": "left", "truncation_side": "right",
                      "tokenizer_extra_configs": {}},
        "train": {"total_steps": 10, "seq_length": 64, "epochs": 100, "batch_size": 8, "checkpoint_interval": 8,
                  "eval_interval": 6, "pipeline": "PromptPipeline", "trainer": "AcceleratePPOTrainer",
                  "trainer_kwargs": {}, "project_name": "trlx", "run_name": None, "entity_name": None,
                  "group_name": None, "checkpoint_dir": str(runs), "rollout_logging_dir": None, "save_best": True,
                  "save_optimizer": True, "resume_from_checkpoint": None, "tracker": "wandb", "logging_dir": None,
                  "tags": [], "seed": 1000, "minibatch_size": None},
    }


def test_a_trlx_config_file_and_reward_fn_train_here(tiny_kit, tmp_path, caplog):
    path = tmp_path / "ppo_trlx.yml"
    path.write_text(yaml.safe_dump(trlx_file(tiny_kit, tmp_path / "ckpts")))
    seen: list[str] = []

    def reward_fn(samples, prompts, outputs, **kwargs):  # a trlX reward_fn: one score per sample
        seen.extend(samples)
        return [min(len(o), 30) / 30 for o in outputs]

    config = load_config(path)
    caplog.set_level(logging.INFO)
    status = train(config, reward_fn=reward_fn, prompts=PROMPTS, eval_prompts=PROMPTS[:4])

    # 10 optimizer steps at 4 an iteration: 3 iterations (trlX would stop 2 steps into the third).
    assert (status.state, status.step) == ("finished", 3)
    said = caplog.text
    assert "total_steps 10 optimizer steps" in said and "3 PPO iterations" in said
    assert "keys with no effect here" in said and "train.pipeline" in said
    run = tmp_path / "ckpts" / "ppo_trlx"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # eval_interval 6 optimizer steps = 1.5 iterations: trlX evaluates at steps 6 and 12 (iterations 2 and 3),
    # and before training.
    assert [m["step"] for m in metrics if "eval/reward_mean" in m] == [0, 2, 3]
    # checkpoint_interval 8 = 2 iterations, and the end.
    assert sorted(p.name for p in run.glob("step-*")) == ["step-2", "step-3"]
    assert seen and not any(s.endswith("<|endoftext|>") for s in seen)

    # num_layers_unfrozen 1: the embeddings and block 0 are the initial ones, block 1 trained.
    start = load_file(tiny_kit / "tiny-gpt2" / "model.safetensors")
    end = load_file(run / "step-3" / "model.safetensors")
    frozen = [k for k in start if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))]
    trained = [k for k in start if k.startswith("transformer.h.1.")]
    assert frozen and trained
    assert all(torch.equal(start[k].float(), end[k].float()) for k in frozen)
    assert any(not torch.equal(start[k].float(), end[k].float()) for k in trained)
