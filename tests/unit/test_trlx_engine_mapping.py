"""train.engine=trlx without trlX: the project config -> trlX TRLConfig mapping, unit conversion, and the start checks
(environment versions through a fake python, configs trlX cannot honour). tests/e2e/test_trlx_engine.py runs trlX."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from services.trainer import trlx_engine
from services.trainer.config import load_config
from services.trainer.trlx_engine import (
    TRAINER_NAME,
    TrlxConfigError,
    TrlxEngineError,
    _cyclic_multiple,
    check_engine_environment,
    check_trlx_config,
    trlx_config,
    trlx_python,
)
from tests.conftest import ROOT

# The fields of trlX's dataclasses at commit 3340c2f (trlx/data/configs.py, trlx/models/modeling_ppo.py PPOConfig):
# TRLConfig.to_dict() writes each section's __dict__, so these are exactly its keys.
TRLX_SECTIONS = {
    "method": {"name", "ppo_epochs", "num_rollouts", "chunk_size", "init_kl_coef", "target", "horizon", "gamma", "lam",
               "cliprange", "cliprange_value", "vf_coef", "scale_reward", "ref_mean", "ref_std", "cliprange_reward",
               "gen_kwargs", "gen_experience_kwargs", "num_value_layers_unfrozen"},
    "model": {"model_path", "model_arch_type", "num_layers_unfrozen", "peft_config", "model_extra_configs"},
    "tokenizer": {"tokenizer_path", "padding_side", "truncation_side", "tokenizer_extra_configs"},
    "optimizer": {"name", "kwargs"},
    "scheduler": {"name", "kwargs"},
    "train": {"total_steps", "seq_length", "epochs", "batch_size", "checkpoint_interval", "eval_interval", "pipeline",
              "trainer", "trainer_kwargs", "project_name", "run_name", "entity_name", "group_name", "checkpoint_dir",
              "rollout_logging_dir", "save_best", "save_optimizer", "resume_from_checkpoint", "tracker", "logging_dir",
              "tags", "seed", "minibatch_size"},
}


def tiny(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", ["model.model_path=/kit/tiny-gpt2", "train.engine=trlx",
                                                         "model.num_layers_unfrozen=2", "method.max_grad_norm=null",
                                                         *overrides])


def test_tiny_preset_maps_to_every_trlx_key_in_trlx_units():
    config = tiny("train.total_steps=40")
    d = trlx_config(config, "/w/model", "/w/tokenizer", "/w/trlx")
    assert {k: set(v) for k, v in d.items()} == TRLX_SECTIONS
    json.dumps(d)  # the spec is JSON
    assert config.optimizer_steps_per_iteration == 4 * 64 // 16 == 16
    assert d["train"] == {
        "total_steps": 640, "seq_length": 256, "epochs": 40, "batch_size": 16,
        "checkpoint_interval": 641, "eval_interval": 641,  # trlX's own points: past the end
        "pipeline": "PromptPipeline", "trainer": TRAINER_NAME, "trainer_kwargs": {}, "project_name": "rlhf-services",
        "run_name": "tiny", "entity_name": None, "group_name": None, "checkpoint_dir": "/w/trlx",
        "rollout_logging_dir": None, "save_best": False, "save_optimizer": False, "resume_from_checkpoint": None,
        "tracker": None, "logging_dir": None, "tags": [], "seed": 1000, "minibatch_size": None}
    assert d["method"] == {
        "name": "PPOConfig", "ppo_epochs": 4, "num_rollouts": 64, "chunk_size": 64, "init_kl_coef": 0.1,
        "target": 6.0, "horizon": 10000, "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2,
        "vf_coef": 1.0, "scale_reward": None, "ref_mean": None, "ref_std": None, "cliprange_reward": 10.0,
        "gen_kwargs": {"max_new_tokens": 20, "top_k": 0, "top_p": 1.0, "do_sample": True, "temperature": 1.0},
        "gen_experience_kwargs": None, "num_value_layers_unfrozen": 0}
    assert d["model"] == {"model_path": "/w/model", "model_arch_type": "causal", "num_layers_unfrozen": 2,
                          "peft_config": None, "model_extra_configs": {"attn_implementation": "eager"}}
    assert d["tokenizer"] == {"tokenizer_path": "/w/tokenizer", "padding_side": "left", "truncation_side": "right",
                              "tokenizer_extra_configs": {}}
    assert d["optimizer"] == {"name": "adamw", "kwargs": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                          "weight_decay": 1e-6}}
    # `constant` does not exist in trlX: LinearLR with both factors 1 is constant.
    assert d["scheduler"] == {"name": "linear", "kwargs": {"start_factor": 1.0, "end_factor": 1.0,
                                                           "total_iters": 640}}


def test_every_method_key_follows_the_project_config():
    config = tiny("method.num_rollouts=96", "method.chunk_size=32", "method.ppo_epochs=2", "method.init_kl_coef=0.05",
                  "method.target=null", "method.horizon=500", "method.gamma=0.99", "method.lam=0.9",
                  "method.cliprange=0.1", "method.cliprange_value=0.3", "method.vf_coef=0.5",
                  "method.scale_reward=running", "method.ref_mean=0.5", "method.ref_std=2.0",
                  "method.cliprange_reward=0", "method.gen_kwargs.max_new_tokens=12", "method.gen_kwargs.top_k=5",
                  "method.gen_kwargs.temperature=0.7", "method.gen_experience_kwargs.max_new_tokens=12",
                  "method.gen_experience_kwargs.top_p=0.9", "method.gen_experience_kwargs.repetition_penalty=1.1")
    m = trlx_config(config, "m", "t", "c")["method"]
    assert m == {
        "name": "PPOConfig", "ppo_epochs": 2, "num_rollouts": 96, "chunk_size": 32, "init_kl_coef": 0.05,
        "target": None, "horizon": 500, "gamma": 0.99, "lam": 0.9, "cliprange": 0.1, "cliprange_value": 0.3,
        "vf_coef": 0.5, "scale_reward": "running", "ref_mean": 0.5, "ref_std": 2.0, "cliprange_reward": 0.0,
        "gen_kwargs": {"max_new_tokens": 12, "top_k": 5, "top_p": 1.0, "do_sample": True, "temperature": 0.7},
        "gen_experience_kwargs": {"max_new_tokens": 12, "top_k": 0, "top_p": 0.9, "do_sample": True,
                                  "temperature": 1.0, "repetition_penalty": 1.1},
        "num_value_layers_unfrozen": 0}
    # 2 epochs x 96 rollouts / 16 = 12 optimizer steps an iteration
    assert trlx_config(config, "m", "t", "c")["train"]["total_steps"] == config.train.total_steps * 12


@pytest.mark.parametrize("value, expected", [("ignored", None), ("running", "running"), ("ref", "ref"),
                                             ("null", None), ("false", None)])
def test_scale_reward_passes_only_what_trlx_acts_on(value, expected):
    assert trlx_config(tiny(f"method.scale_reward={value}"), "m", "t", "c")["method"]["scale_reward"] == expected


def test_schedulers_count_optimizer_steps_with_the_project_defaults_written_out():
    cosine = trlx_config(tiny("train.total_steps=10", "scheduler.name=cosine_annealing"), "m", "t", "c")
    assert cosine["scheduler"] == {"name": "cosine_annealing", "kwargs": {"T_max": 160, "eta_min": 0.0}}
    cosine = trlx_config(tiny("scheduler.name=cosine_annealing", "scheduler.kwargs.T_max=50",
                              "scheduler.kwargs.eta_min=1e-6"), "m", "t", "c")
    assert cosine["scheduler"]["kwargs"] == {"T_max": 50, "eta_min": 1e-6}  # already optimizer steps: as they are
    linear = trlx_config(tiny("train.total_steps=10", "scheduler.name=linear"), "m", "t", "c")
    assert linear["scheduler"] == {"name": "linear", "kwargs": {"start_factor": 1.0, "end_factor": 0.0,
                                                                "total_iters": 160}}
    linear = trlx_config(tiny("scheduler.name=linear", "scheduler.kwargs.end_factor=0.5"), "m", "t", "c")
    assert linear["scheduler"]["kwargs"]["end_factor"] == 0.5


def test_a_trlx_default_config_comes_back_as_trlx_wrote_it():
    """configs/ppo_sentiments.yaml is trlX's default_ppo_config(): read, translated to iterations and mapped back,
    every method, optimizer and scheduler value is trlX's again; the train section is in optimizer steps again."""
    config = load_config(ROOT / "configs" / "ppo_sentiments.yaml", ["train.engine=trlx"])
    original = json.loads(json.dumps(__import__("yaml").safe_load((ROOT / "configs" / "ppo_sentiments.yaml")
                                                                  .read_text())))
    d = trlx_config(config, "m", "t", "c")
    expected_method = dict(original["method"], scale_reward=None,  # "ignored": trlX scales nothing either
                           gen_kwargs=dict(original["method"]["gen_kwargs"], temperature=1.0))
    assert d["method"] == expected_method
    assert d["optimizer"] == original["optimizer"]
    assert d["scheduler"] == original["scheduler"]
    assert d["model"]["num_layers_unfrozen"] == original["model"]["num_layers_unfrozen"] == 2
    # 10000 optimizer steps capped by 100 epochs: 100 iterations of 16 steps
    assert (d["train"]["total_steps"], d["train"]["epochs"]) == (1600, 100)
    assert {k: d["train"][k] for k in ("seq_length", "batch_size", "seed", "minibatch_size", "pipeline")} == \
        {k: original["train"][k] for k in ("seq_length", "batch_size", "seed", "minibatch_size", "pipeline")}
    check_trlx_config(config)  # trlX's own defaults run as they are


def test_configs_trlx_cannot_honour_are_refused_with_the_reason():
    with pytest.raises(TrlxConfigError, match=r"num_layers_unfrozen is -1 .*separate reference model.*1\.\.n_layer"):
        check_trlx_config(tiny("model.num_layers_unfrozen=-1"))
    with pytest.raises(TrlxConfigError, match="num_layers_unfrozen is 0: only the value head"):
        check_trlx_config(tiny("model.num_layers_unfrozen=0"))
    with pytest.raises(TrlxConfigError, match="Python reward_fn.*reward service"):
        check_trlx_config(tiny(), reward_fn=lambda samples, **kw: [0.0] * len(samples))
    with pytest.raises(TrlxConfigError, match="max_grad_norm is 1.0: trlX has no gradient clipping"):
        check_trlx_config(tiny("method.max_grad_norm=1.0"))
    with pytest.raises(TrlxConfigError, match=r"num_rollouts \(64\) is not a multiple of method.chunk_size \(48\).*"
                                              r"96 rollouts"):
        check_trlx_config(tiny("method.chunk_size=48"))
    with pytest.raises(TrlxConfigError, match="ref_mean set and ref_std unset"):
        check_trlx_config(tiny("method.scale_reward=ref", "method.ref_mean=0.5"))
    check_trlx_config(tiny("method.scale_reward=ref", "method.ref_mean=0.5", "method.ref_std=0.3"))
    gpt2 = {"n_layer": 2, "n_embd": 128}
    with pytest.raises(TrlxConfigError, match="num_layers_unfrozen is 3 but the policy has 2 blocks"):
        check_trlx_config(tiny("model.num_layers_unfrozen=3"), model_config=gpt2)
    with pytest.raises(TrlxConfigError, match=r"value_head_hidden is 64: trlX's value head is always 2 x hidden \(256"):
        check_trlx_config(tiny("model.value_head_hidden=64"), model_config=gpt2)
    check_trlx_config(tiny("model.value_head_hidden=256"), model_config=gpt2)
    # every problem at once, in one message
    with pytest.raises(TrlxConfigError) as info:
        check_trlx_config(tiny("model.num_layers_unfrozen=-1", "method.max_grad_norm=1.0"))
    assert "-1" in str(info.value) and "max_grad_norm" in str(info.value)


def fake_python(tmp_path: Path, versions: dict | None, exit_code: int = 0, text: str | None = None) -> Path:
    path = tmp_path / "python"
    out = text if text is not None else json.dumps(versions)
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{out}\nEOF\nexit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


GOOD = {"python": "3.11.7", "trlx": "0.7.0", "transformers": "4.51.3", "accelerate": "0.24.1", "deepspeed": "0.19.8",
        "torch": "2.13.0+cpu", "httpx": "0.28.1", "pydantic": "2.14.4", "pydantic-settings": "2.12.0",
        "pyyaml": "6.0.3", "torchtyping": "0.1.5", "ray": "2.60.0"}


def test_a_good_environment_passes(tmp_path):
    check_engine_environment(fake_python(tmp_path, GOOD))
    check_engine_environment(fake_python(tmp_path, GOOD | {"transformers": "4.46.0", "accelerate": "0.24.0"}))


@pytest.mark.parametrize("change, message", [
    ({"trlx": None}, "trlX is not installed"),
    ({"transformers": "4.52.0"}, r"transformers is 4\.52\.0, trlX needs <= 4\.51\.3"),
    ({"transformers": "5.24.0"}, r"transformers is 5\.24\.0"),
    ({"accelerate": "0.25.0"}, r"accelerate is 0\.25\.0, trlX needs 0\.24\.1 \(0\.25\+ fails to save tied weights\)"),
    ({"accelerate": "1.15.0"}, r"accelerate is 1\.15\.0"),
    ({"deepspeed": None}, "deepspeed is not installed.*DS_BUILD_OPS=0"),
    ({"httpx": None, "pyyaml": None}, "the runner needs httpx, pyyaml"),
])
def test_a_wrong_environment_says_what_is_wrong_and_what_to_run(tmp_path, change, message):
    with pytest.raises(TrlxEngineError, match=message) as info:
        check_engine_environment(fake_python(tmp_path, GOOD | change))
    assert "make trlx-env TRLX_SRC=" in str(info.value)


def test_a_missing_or_broken_environment_says_how_to_build_it(tmp_path, monkeypatch):
    with pytest.raises(TrlxEngineError, match=r"no trlX environment .*does not exist.*make trlx-env TRLX_SRC="):
        check_engine_environment(tmp_path / "nowhere" / "python")
    monkeypatch.setenv("RLHF_TRLX_PYTHON", str(tmp_path / "nowhere" / "python"))
    assert trlx_python() == tmp_path / "nowhere" / "python"
    with pytest.raises(TrlxEngineError, match="RLHF_TRLX_PYTHON="):
        check_engine_environment()
    with pytest.raises(TrlxEngineError, match="failed to report its packages.*boom"):
        check_engine_environment(fake_python(tmp_path, None, exit_code=1, text="boom"))


def test_the_default_environment_is_the_repo_s_cache(monkeypatch):
    monkeypatch.delenv("RLHF_TRLX_PYTHON", raising=False)
    assert trlx_python() == ROOT / ".cache" / "trlx-env" / "bin" / "python"


def test_the_config_is_checked_before_the_environment(tmp_path):
    with pytest.raises(TrlxConfigError, match="max_grad_norm"):
        check_engine_environment(tmp_path / "nowhere", tiny("method.max_grad_norm=1.0"))


def test_prompts_are_extended_cyclically_to_whole_chunks():
    assert _cyclic_multiple(["a", "b", "c"], 3) == ["a", "b", "c"]
    assert _cyclic_multiple(["a", "b", "c", "d", "e"], 4) == ["a", "b", "c", "d", "e", "a", "b", "c"]
    assert _cyclic_multiple(["a"], 3) == ["a", "a", "a"]


def test_the_engine_module_needs_neither_trlx_nor_the_trlx_environment():
    source = Path(trlx_engine.__file__).read_text()
    assert "import trlx" not in source and "from trlx" not in source


def test_the_runner_imports_nothing_heavy_until_it_runs():
    """It is started in the trlX environment (transformers 4.51, accelerate 0.24): importing it must not pull this
    project's transformers-5 or accelerate-1 code, nor trlX itself before it runs."""
    import subprocess
    import sys

    code = ("import sys, services.trainer.trlx_runner; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'trlx', 'torch', 'services.trainer.policy', "
            "'services.trainer.loop', 'services.trainer.run') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_runner_measures_responses_as_the_native_loop():
    import torch

    from services.trainer.policy import response_mask as native_mask
    from services.trainer.trlx_runner import _number, response_mask

    eos = 0
    responses = torch.tensor([[5, 6, 0, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0], [5, 0, 6, 0, 0]])
    assert torch.equal(response_mask(responses, eos, eos), native_mask(responses, eos))
    # a tokenizer whose pad is not its EOS: padding after a truncated response is not response
    assert response_mask(torch.tensor([[5, 6, 1, 1]]), eos, 1).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert _number(torch.tensor(2.5, requires_grad=True)) == 2.5 and _number("x") is None and _number(3) == 3.0
    assert _number(torch.ones(2)) is None and _number(True) is None
