"""Typed optimizer and scheduler settings (services/trainer/config.py): a key the chosen optimizer or schedule does
not take is refused by name, settings left out keep torch's defaults (as trlX passes kwargs), the project's defaults
fill the rest, every documented section says what each field means, and a dumped config loads back the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ValidationError

from services.trainer import config as config_module
from services.trainer.config import OptimizerConfig, SchedulerConfig, TrainerConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["tiny.yaml", "ppo_sentiments.yaml", "tiny-negative.yaml", "tiny-3label.yaml", "finbert_news.yaml"]


def one_param() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2))]


def tiny(*overrides: str) -> TrainerConfig:
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


# -- keys that do not belong ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, named", [
    (["optimizer.kwargs.momentum=0.9"], "momentum"),  # adamw has no momentum
    (["optimizer.kwargs.lrr=1e-4"], "lrr"),  # a typo no longer slips through
    (["optimizer.name=sgd"], "betas, eps are not"),  # tiny.yaml's Adam settings do not fit SGD
    (["scheduler.name=cosine_annealing", "scheduler.kwargs.start_factor=0.5"], "start_factor"),
    (["scheduler.name=linear", "scheduler.kwargs.T_max=10"], "T_max"),
    (["scheduler.kwargs.T_max=10"], "T_max is not among its settings (it takes none)"),  # tiny.yaml: constant
])
def test_a_key_the_chosen_name_does_not_take_is_refused_by_name(overrides, named):
    with pytest.raises(ValidationError, match="kwargs do not fit") as error:
        tiny(*overrides)
    assert named in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.kwargs.lr=-1"], "kwargs.lr\n  Input should be greater than or equal to 0"),
    (["optimizer.kwargs.betas=[0.9, 1.5]"], "kwargs.betas.1\n  Input should be less than 1"),
    (["scheduler.name=linear", "scheduler.kwargs.start_factor=0"], "kwargs.start_factor\n  Input should be greater"),
    (["scheduler.name=cosine_annealing", "scheduler.kwargs.T_max=10.5"], "kwargs.T_max\n  Input should be a valid "
                                                                          "integer"),
    # what only torch knows, at load rather than at the first update
    (["optimizer.name=sgd", "optimizer.kwargs={lr: 0.1, nesterov: true}"], "Nesterov momentum requires a momentum"),
])
def test_bad_values_fail_at_load_with_the_key(overrides, message):
    with pytest.raises(ValidationError, match=message):
        tiny(*overrides)


# -- defaults -------------------------------------------------------------------------------------------------------


def test_no_optimizer_kwargs_take_the_project_defaults_the_optimizer_takes():
    adamw = OptimizerConfig().build(one_param())
    assert isinstance(adamw, torch.optim.AdamW)
    assert (adamw.defaults["lr"], tuple(adamw.defaults["betas"]), adamw.defaults["eps"],
            adamw.defaults["weight_decay"]) == (3e-5, (0.9, 0.95), 1e-8, 1e-6)
    sgd = OptimizerConfig(name="sgd").build(one_param())
    assert (sgd.defaults["lr"], sgd.defaults["weight_decay"], sgd.defaults["momentum"]) == (3e-5, 1e-6, 0)


def test_settings_left_out_keep_torchs_defaults_as_trlx_passes_them():
    optimizer = OptimizerConfig(name="adamw", kwargs={"lr": 1e-4}).build(one_param())
    torch_default = torch.optim.AdamW(one_param(), lr=1e-4)
    for key in ("betas", "eps", "weight_decay", "amsgrad"):
        assert optimizer.defaults[key] == torch_default.defaults[key], key
    assert OptimizerConfig(name="sgd", kwargs={"lr": 0.1, "momentum": 0.9}).torch_kwargs() == {"lr": 0.1,
                                                                                                 "momentum": 0.9}


@pytest.mark.parametrize("kwargs, fused, foreach", [({}, True, None), ({"fused": False}, False, None),
                                                    ({"foreach": True}, None, True)])
def test_adam_steps_fused_unless_told_otherwise(kwargs, fused, foreach):
    optimizer = OptimizerConfig(name="adamw", kwargs={"lr": 1e-3, **kwargs}).build(one_param())
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (fused, foreach)


def test_schedules_default_to_the_whole_run_and_count_optimizer_steps():
    total = 40
    linear = SchedulerConfig(name="linear").build(OptimizerConfig().build(one_param()), total)
    assert isinstance(linear, torch.optim.lr_scheduler.LinearLR)
    assert (linear.start_factor, linear.end_factor, linear.total_iters) == (1.0, 0.0, total)
    cosine = SchedulerConfig(name="cosine_annealing").build(OptimizerConfig().build(one_param()), total)
    assert isinstance(cosine, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert (cosine.T_max, cosine.eta_min) == (total, 0.0)
    given = SchedulerConfig(name="cosine_annealing", kwargs={"T_max": 7, "eta_min": 1e-6})
    assert given.torch_kwargs(total) == {"T_max": 7, "eta_min": 1e-6}


def test_a_constant_schedule_keeps_the_rate():
    optimizer = OptimizerConfig(kwargs={"lr": 0.5}).build(one_param())
    scheduler = SchedulerConfig().build(optimizer, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [0.5]


def test_the_run_length_of_a_schedule_is_the_runs_optimizer_steps():
    config = tiny("train.total_steps=10", "scheduler.name=linear")
    assert config.total_optimizer_steps == 10 * config.optimizer_steps_per_iteration
    assert config.scheduler.torch_kwargs(config.total_optimizer_steps)["total_iters"] == config.total_optimizer_steps


# -- a dumped config (checkpoint manifests) loads back the same -------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    [], ["optimizer.name=sgd", "optimizer.kwargs={lr: 0.01, momentum: 0.9, nesterov: true}"],
    ["scheduler.name=linear", "scheduler.kwargs.end_factor=0.5"],
    ["scheduler.name=cosine_annealing", "scheduler.kwargs.T_max=1e12"],
    ["optimizer.kwargs={lr: 1e-4}", "method.gen_kwargs.repetition_penalty=1.1"],
])
def test_a_dumped_config_round_trips(overrides):
    config = tiny(*overrides)
    dumped = json.loads(json.dumps(config.model_dump(mode="json")))
    reloaded = TrainerConfig(**dumped)
    assert reloaded.model_dump() == config.model_dump()
    assert reloaded.model_dump(mode="json") == dumped


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_round_trips(preset):
    config = load_config(ROOT / "configs" / preset)
    reloaded = TrainerConfig(**json.loads(json.dumps(config.model_dump(mode="json"))))
    assert reloaded.model_dump() == config.model_dump()
    assert reloaded.optimizer.torch_kwargs() == config.optimizer.torch_kwargs()


# -- documentation ----------------------------------------------------------------------------------------------------


DOCUMENTED = ["ModelConfig", "TokenizerConfig", "OptimizerConfig", "SchedulerConfig", "AdamKwargs", "SGDKwargs",
              "CosineAnnealingKwargs", "LinearKwargs", "GenKwargs", "MethodConfig"]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_field_says_what_it_does(name):
    section: type[BaseModel] = getattr(config_module, name)
    undocumented = [field for field, info in section.model_fields.items() if not info.description]
    assert not undocumented
