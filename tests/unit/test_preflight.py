"""Which config changes break a resume: those that change what a checkpoint's weights and optimizer state mean or
how they load; not the run's length, intervals, services or PPO settings."""

from __future__ import annotations

import pytest

from services.trainer.config import load_config
from services.trainer.preflight import RESUME_BREAKING, resume_conflicts
from tests.conftest import ROOT


def dumped(*overrides: str) -> dict:
    return load_config(ROOT / "configs" / "tiny.yaml", ["model.model_path=models/tiny-gpt2", *overrides]) \
        .model_dump(mode="json")


@pytest.mark.parametrize("override", [
    "train.total_steps=400", "train.eval_interval=3", "train.checkpoint_interval=7", "train.keep_checkpoints=2",
    "train.batch_size=32", "train.mixed_precision=no", "train.torch_threads=4", "train.seed=7",
    "reward.url=http://elsewhere:9000", "data.eval_prompts=8", "method.init_kl_coef=0.2", "method.ppo_epochs=2",
    "method.gen_kwargs.max_new_tokens=30", "generator.url=http://127.0.0.1:8001", "tokenizer.truncation_side=left",
    "train.run_name=other",
])
def test_settings_a_resumed_run_may_change_are_no_conflict(override):
    assert resume_conflicts(dumped(), dumped(override)) == []


@pytest.mark.parametrize("override, key, rule", [
    ("model.model_path=models/other", "model.model_path", "model.model_path"),
    ("model.revision=v2", "model.revision", "model.revision"),
    ("tokenizer.tokenizer_path=models/other-tokenizer", "tokenizer.tokenizer_path", "tokenizer.tokenizer_path"),
    ("model.value_head_hidden=64", "model.value_head_hidden", "model.value_head_hidden"),
    ("model.num_layers_unfrozen=2", "model.num_layers_unfrozen", "model.num_layers_unfrozen"),
    ("optimizer.kwargs.lr=0.5", "optimizer.kwargs.lr", "optimizer"),
    ("scheduler.name=linear", "scheduler.name", "scheduler"),
    ("train.engine=trlx", "train.engine", "train.engine"),
])
def test_changes_to_what_the_checkpoint_means_are_conflicts(override, key, rule):
    changed = resume_conflicts(dumped(), dumped(override))
    assert [(k, r) for k, r, _, _ in changed] == [(key, rule)]
    assert rule in RESUME_BREAKING


def test_each_conflict_has_the_saved_and_the_new_value():
    assert resume_conflicts(dumped(), dumped("model.model_path=models/other", "optimizer.kwargs.lr=0.5")) == [
        ("model.model_path", "model.model_path", "models/tiny-gpt2", "models/other"),
        ("optimizer.kwargs.lr", "optimizer", 0.0001, 0.5)]


def test_the_tokenizer_is_compared_as_used_and_a_path_as_the_folder_it_names(tmp_path):
    # an unset tokenizer path is the model's: naming it explicitly changes nothing
    assert resume_conflicts(dumped(), dumped("tokenizer.tokenizer_path=models/tiny-gpt2")) == []
    model = tmp_path / "tiny-gpt2"
    model.mkdir()
    relative = tmp_path / "sub" / ".." / "tiny-gpt2"
    (tmp_path / "sub").mkdir()
    assert resume_conflicts(dumped(f"model.model_path={model}"), dumped(f"model.model_path={relative}")) == []


def test_keys_a_saved_config_lacks_are_not_compared():
    saved = dumped()
    del saved["model"]["value_head_hidden"], saved["scheduler"]
    assert resume_conflicts(saved, dumped("model.value_head_hidden=64", "scheduler.name=linear")) == []
    assert resume_conflicts({}, dumped("model.model_path=models/other")) == []
