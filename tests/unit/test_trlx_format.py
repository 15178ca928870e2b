"""trlX config files read unchanged (services/trainer/trlx_format.py): translation into this project's units, the
notes and the one warning, refusals, accepted trlX variants, overrides in trlX's units, and configs/ppo_sentiments.yaml
being exactly trlX's `default_ppo_config()`. Pure config work: no models."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from services.trainer import trackers, trlx_format
from services.trainer.config import expand_env, load_config
from services.trainer.trlx_format import IGNORED, TrlxConfigError

ROOT = Path(__file__).resolve().parents[2]
TRACKING_KEYS = ("tracker", "logging_dir", "project_name", "entity_name", "group_name", "tags")
TRLX_SECTIONS = ("method", "model", "optimizer", "scheduler", "tokenizer", "train")

# trlX's `default_ppo_config().to_dict()` at CarperAI/trlx 3340c2f (trlx/data/default_configs.py), keys in to_dict
# order (the dataclasses' field order).
TRLX_DEFAULT_PPO = {
    "method": {
        "name": "PPOConfig", "ppo_epochs": 4, "num_rollouts": 128, "chunk_size": 128, "init_kl_coef": 0.001,
        "target": None, "horizon": 10000, "gamma": 1, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2,
        "vf_coef": 1, "scale_reward": "ignored", "ref_mean": None, "ref_std": None, "cliprange_reward": 10,
        "gen_kwargs": {"max_new_tokens": 40, "top_k": 0, "top_p": 1.0, "do_sample": True},
        "gen_experience_kwargs": None, "num_value_layers_unfrozen": 0,
    },
    "model": {
        "model_path": "lvwerra/gpt2-imdb", "model_arch_type": "causal", "num_layers_unfrozen": 2,
        "peft_config": None, "model_extra_configs": {},
    },
    "optimizer": {"name": "adamw", "kwargs": {"lr": 3e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 1e-6}},
    "scheduler": {"name": "cosine_annealing", "kwargs": {"T_max": 1e12, "eta_min": 3e-5}},
    "tokenizer": {
        "tokenizer_path": "gpt2", "padding_side": "left", "truncation_side": "right", "tokenizer_extra_configs": {},
    },
    "train": {
        "total_steps": 10000, "seq_length": 1024, "epochs": 100, "batch_size": 32, "checkpoint_interval": 10000,
        "eval_interval": 100, "pipeline": "PromptPipeline", "trainer": "AcceleratePPOTrainer", "trainer_kwargs": {},
        "project_name": "trlx", "run_name": None, "entity_name": None, "group_name": None, "checkpoint_dir": "ckpts",
        "rollout_logging_dir": None, "save_best": True, "save_optimizer": True, "resume_from_checkpoint": None,
        "tracker": "wandb", "logging_dir": None, "tags": [], "seed": 1000, "minibatch_size": None,
    },
}
PER_ITERATION = 4 * 128 // 32  # optimizer steps in one PPO iteration of the default config


def as_yaml_data(value):
    """What a YAML file holds for `value`: tuples become lists."""
    if isinstance(value, dict):
        return {k: as_yaml_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_yaml_data(v) for v in value]
    return value


def trlx_dict(**changes) -> dict:
    """The default dict with `section.key` (or `section.key.sub`) changed; a value of `...` deletes the key."""
    data = copy.deepcopy(TRLX_DEFAULT_PPO)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def write_yaml(tmp_path: Path, data: dict, name: str = "trlx_default.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(as_yaml_data(data), sort_keys=False))
    return path


@pytest.fixture
def default_yaml(tmp_path) -> Path:
    return write_yaml(tmp_path, TRLX_DEFAULT_PPO)


def _diff(a, b, where="") -> list[str]:
    """Every difference between two YAML-shaped values, type included (1 is not 1.0, True is not 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in the first" for k in a.keys() - b.keys()]
        out += [f"{where}.{k}: only in the second" for k in b.keys() - a.keys()]
        for k in a.keys() & b.keys():
            out += _diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{where}[{i}]")]
    if type(a) is not type(b) or a != b:
        return [f"{where}: {a!r} != {b!r}"]
    return []


# 1. The default dict and its YAML: translated values.

@pytest.mark.parametrize("source", ["yaml", "dict"])
def test_default_ppo_config_translates(source, default_yaml):
    config = load_config(default_yaml) if source == "yaml" else load_config(None, base=TRLX_DEFAULT_PPO)
    assert config.translation is not None
    train, method = config.train, config.method
    assert config.optimizer_steps_per_iteration == PER_ITERATION == 16
    # 10000 optimizer steps capped by epochs 100 x 16 = 1600: 100 PPO iterations.
    assert train.total_steps == 100
    assert train.eval_interval == pytest.approx(6.25) and train.checkpoint_interval == pytest.approx(625)
    # trlX evaluates after optimizer steps 100, 200, ... 1600: in iterations ceil(100 k / 16).
    expected_evals = [math.ceil(100 * k / PER_ITERATION) for k in range(1, 17)]
    assert expected_evals[:6] == [7, 13, 19, 25, 32, 38] and expected_evals[-1] == 100
    assert [i for i in range(1, 101) if config.evaluates_after(i)] == expected_evals
    assert [i for i in range(1, 101) if config.checkpoints_after(i)] == [100]
    assert config.model.model_path == "lvwerra/gpt2-imdb" and config.model.num_layers_unfrozen == 2
    assert config.tokenizer.tokenizer_path == "gpt2" and config.tokenizer.truncation_side == "right"
    assert method.scale_reward == "ignored" and method.scaling is None
    assert method.name == "ppoconfig"
    assert (method.ppo_epochs, method.num_rollouts, method.chunk_size, method.init_kl_coef, method.target,
            method.horizon) == (4, 128, 128, 0.001, None, 10000)
    assert (method.gamma, method.lam, method.cliprange, method.cliprange_value, method.vf_coef,
            method.cliprange_reward, method.ref_mean, method.ref_std) == (1, 0.95, 0.2, 0.2, 1, 10, None, None)
    assert config.optimizer.name == "adamw"
    assert as_yaml_data(config.optimizer.torch_kwargs()) == as_yaml_data(TRLX_DEFAULT_PPO["optimizer"]["kwargs"])
    assert config.scheduler.name == "cosine_annealing"
    assert config.scheduler.kwargs.model_dump() == TRLX_DEFAULT_PPO["scheduler"]["kwargs"]
    gen = method.gen_kwargs
    assert (gen.max_new_tokens, gen.top_k, gen.top_p, gen.do_sample) == (40, 0, 1.0, True)
    assert method.gen_experience_kwargs is None and method.rollout_kwargs is gen
    assert train.seed == 1000 and train.seq_length == 1024 and train.batch_size == 32
    assert train.run_name == ("trlx_default" if source == "yaml" else "trlx")
    assert train.checkpoint_dir == Path("ckpts")
    assert config.run_dir == Path("ckpts") / train.run_name
    assert train.engine == "native"


def test_run_name_kept_when_set_and_made_valid_from_odd_file_names(tmp_path):
    assert load_config(write_yaml(tmp_path, trlx_dict(train__run_name="imdb-1"))).train.run_name == "imdb-1"
    assert load_config(write_yaml(tmp_path, TRLX_DEFAULT_PPO, "my run (2).yaml")).train.run_name == "my_run__2_"
    assert load_config(write_yaml(tmp_path, TRLX_DEFAULT_PPO, "_x.yaml")).train.run_name == "run__x"


def test_scheduler_and_optimizer_build_from_translated_default(default_yaml):
    config = load_config(default_yaml)
    optimizer = config.optimizer.build([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW) and tuple(optimizer.defaults["betas"]) == (0.9, 0.95)
    assert (optimizer.defaults["lr"], optimizer.defaults["eps"], optimizer.defaults["weight_decay"]) == \
        (3e-5, 1e-8, 1e-6)
    scheduler = config.scheduler.build(optimizer, config.train.total_steps * config.optimizer_steps_per_iteration)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 1e12


# 2. The notes and the one warning.

def test_notes_state_the_translation(default_yaml):
    notes = load_config(default_yaml).translation.notes
    text = "\n".join(notes)
    for needle in ("10000 optimizer steps", "capped by epochs", "100 PPO iterations", "16 optimizer steps",
                   "ppo_epochs 4", "num_rollouts 128", "batch_size 32"):
        assert needle in text, needle
    eval_note = next(n for n in notes if n.startswith("eval_interval"))
    assert "100 optimizer steps" in eval_note and "7, 13, 19, 25, 32, 38, ... 100" in eval_note
    assert "6.25" in eval_note
    checkpoint_note = next(n for n in notes if n.startswith("checkpoint_interval"))
    assert "10000 optimizer steps" in checkpoint_note and "at the end only (iteration 100)" in checkpoint_note
    assert any("run_name null" in n and "trlx_default" in n for n in notes)
    assert any("num_layers_unfrozen 2" in n for n in notes)
    assert any("scale_reward 'ignored'" in n and "no scaling" in n for n in notes)
    assert not any("stops" in n for n in notes)  # 10000 is past the cap: trlX ends with the last epoch


def test_one_warning_lists_every_trlx_only_key(default_yaml, caplog):
    config = load_config(default_yaml)
    present = [key for key in IGNORED if key.split(".")[1] in TRLX_DEFAULT_PPO[key.split(".")[0]]]
    assert len(present) == len(IGNORED)  # the default dict has every one of them
    assert sorted(config.translation.ignored) == sorted(present)
    logger = logging.getLogger("test_trlx_format")
    with caplog.at_level(logging.INFO, logger="test_trlx_format"):
        config.translation.log(logger)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    for key in present:
        assert key in message, key
    for key in ("train.pipeline", "train.trainer", "train.rollout_logging_dir", "train.save_best"):
        assert key in message
    for key in TRACKING_KEYS:  # translated: see test_tracking_keys_keep_their_meaning
        assert f"train.{key}" not in message
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == len(config.translation.notes)
    assert all(m.startswith("trlX config: ") for m in infos)


def test_warning_lists_only_the_keys_the_file_has(caplog):
    data = trlx_dict(train__rollout_logging_dir=..., train__save_best=..., train__minibatch_size=...)
    config = load_config(None, base=data)
    assert "train.rollout_logging_dir" not in config.translation.ignored
    assert "train.pipeline" in config.translation.ignored
    logger = logging.getLogger("test_trlx_format")
    with caplog.at_level(logging.INFO, logger="test_trlx_format"):
        config.translation.log(logger)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "train.rollout_logging_dir" not in warning.getMessage() and "train.pipeline" in warning.getMessage()


# 3. total_steps within epochs (with and without a remainder), and capped by epochs.

def test_total_steps_with_a_remainder_runs_the_last_iteration_whole():
    config = load_config(None, base=trlx_dict(train__total_steps=50))
    assert config.train.total_steps == 4  # 50 / 16 = 3.125 -> 4 iterations
    notes = config.translation.notes
    assert any("within epochs" in n and "4 PPO iterations" in n for n in notes)
    assert any("trlX stops 2 optimizer steps into iteration 4" in n for n in notes)


def test_remainder_note_when_epochs_equals_the_iterations_needed():
    # trlX: total = min(epochs 4 x 16 = 64, total_steps 50) = 50, so it stops 2 steps into its 4th (last) epoch,
    # exactly as with epochs 100; the note must say so here too.
    config = load_config(None, base=trlx_dict(train__total_steps=50, train__epochs=4))
    assert config.train.total_steps == 4
    assert any("within epochs" in n for n in config.translation.notes)
    assert any("trlX stops 2 optimizer steps into iteration 4" in n for n in config.translation.notes), \
        config.translation.notes


def test_total_steps_an_exact_multiple():
    config = load_config(None, base=trlx_dict(train__total_steps=64, train__eval_interval=32,
                                              train__checkpoint_interval=48))
    assert config.train.total_steps == 4
    assert config.train.eval_interval == 2 and config.train.checkpoint_interval == 3
    assert [i for i in range(1, 5) if config.evaluates_after(i)] == [2, 4]
    assert [i for i in range(1, 5) if config.checkpoints_after(i)] == [3, 4]
    assert not any("stops" in n for n in config.translation.notes)
    assert any("64 optimizer steps, within epochs (100) -> 4 PPO iterations" in n for n in config.translation.notes)


def test_epochs_cap_the_run():
    config = load_config(None, base=trlx_dict(train__epochs=3))
    assert config.train.total_steps == 3
    assert any("capped by epochs (3) -> 3 PPO iterations" in n for n in config.translation.notes)
    assert not any("stops" in n for n in config.translation.notes)


def test_per_iteration_follows_the_method_and_batch_size():
    # ppo_epochs 2 x num_rollouts 64 / batch_size 16 = 8 optimizer steps an iteration.
    config = load_config(None, base=trlx_dict(method__ppo_epochs=2, method__num_rollouts=64, train__batch_size=16,
                                              train__total_steps=80, train__eval_interval=20))
    assert config.optimizer_steps_per_iteration == 8
    assert config.train.total_steps == 10 and config.train.eval_interval == 2.5
    assert [i for i in range(1, 11) if config.evaluates_after(i)] == [3, 5, 8, 10]


# 4. Refusals, naming the key.

REFUSALS = {
    "peft_config": ({"model__peft_config": {"peft_type": "LORA", "r": 8}}, "model.peft_config"),
    "seq2seq": ({"model__model_arch_type": "seq2seq"}, "model.model_arch_type"),
    "ilql": ({"method__name": "ILQLConfig"}, "method.name"),
    "resume_from_checkpoint": ({"train__resume_from_checkpoint": "ckpts/checkpoint_01000"},
                               "train.resume_from_checkpoint"),
    "value_layers": ({"method__num_value_layers_unfrozen": 1}, "method.num_value_layers_unfrozen"),
    "adam_8bit": ({"optimizer__name": "adam_8bit_bnb"}, "optimizer.name"),
    "adamw_8bit": ({"optimizer__name": "adamw_8bit_bnb"}, "optimizer.name"),
    "scheduler_step": ({"scheduler__name": "step"}, "scheduler.name"),
    "padding_right": ({"tokenizer__padding_side": "right"}, "tokenizer.padding_side"),
    "model_extra_configs": ({"model__model_extra_configs": {"torch_dtype": "bfloat16"}}, "model.model_extra_configs"),
    "tokenizer_extra_configs": ({"tokenizer__tokenizer_extra_configs": {"use_fast": False}},
                                "tokenizer.tokenizer_extra_configs"),
    "no_max_new_tokens": ({"method__gen_kwargs": {"max_length": 60, "top_k": 0, "do_sample": True}},
                          "max_new_tokens"),
    "rollouts_not_multiple": ({"method__num_rollouts": 100}, "method.num_rollouts"),
    "total_steps_zero": ({"train__total_steps": 0}, "train.total_steps"),
    "total_steps_string": ({"train__total_steps": "many"}, "train.total_steps"),
    "total_steps_bool": ({"train__total_steps": True}, "train.total_steps"),
    "eval_interval_zero": ({"train__eval_interval": 0}, "train.eval_interval"),
    "batch_size_zero": ({"train__batch_size": 0}, "train.batch_size"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_key(case, tmp_path):
    changes, key = REFUSALS[case]
    path = write_yaml(tmp_path, trlx_dict(**changes))
    with pytest.raises(TrlxConfigError, match=key.replace(".", r"\.")) as excinfo:
        load_config(path)
    assert isinstance(excinfo.value, ValueError)
    assert len(str(excinfo.value)) > len(key) + 10  # says why, not only which


def test_refusal_messages_say_why():
    with pytest.raises(TrlxConfigError, match="PEFT"):
        load_config(None, base=trlx_dict(model__peft_config={"peft_type": "LORA"}))
    with pytest.raises(TrlxConfigError, match="seq2seq"):
        load_config(None, base=trlx_dict(model__model_arch_type="seq2seq"))
    with pytest.raises(TrlxConfigError, match="'ilqlconfig'.*only trlX's PPOConfig"):
        load_config(None, base=trlx_dict(method__name="ILQLConfig"))
    with pytest.raises(TrlxConfigError, match=r"\(100\) must be a multiple of train\.batch_size \(32\)"):
        load_config(None, base=trlx_dict(method__num_rollouts=100))
    with pytest.raises(TrlxConfigError, match="'many'"):
        load_config(None, base=trlx_dict(train__total_steps="many"))
    with pytest.raises(TrlxConfigError, match="'step'"):
        load_config(None, base=trlx_dict(scheduler__name="step"))


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(TrlxConfigError, match="method must be a section"):
        load_config(None, base=trlx_dict(method=["PPOConfig"]))


def test_an_unknown_key_in_a_trlx_file_still_fails_validation():
    with pytest.raises(ValidationError, match="bogus"):
        load_config(None, base=trlx_dict(train__bogus=1))


# 5. Accepted trlX variants.

def test_cliprange_reward_zero_turns_clipping_off():
    config = load_config(None, base=trlx_dict(method__cliprange_reward=0))
    assert config.method.cliprange_reward == 0
    assert any("cliprange_reward 0" in n and "not clipped" in n for n in config.translation.notes)


@pytest.mark.parametrize("scale, scaling", [(False, None), ("running", "running"), ("ref", "ref"), (None, None),
                                            ("ignored", None)])
def test_scale_reward_variants(scale, scaling):
    config = load_config(None, base=trlx_dict(method__scale_reward=scale))
    assert config.method.scale_reward == scale
    assert config.method.scaling == scaling
    noted = any(n.startswith("scale_reward") for n in config.translation.notes)
    assert noted == (scale not in (None, "running", "ref"))


def test_gen_experience_kwargs_sample_the_rollouts():
    experience = {"max_new_tokens": 48, "top_k": 50, "top_p": 0.9, "do_sample": True, "temperature": 0.8}
    config = load_config(None, base=trlx_dict(method__gen_experience_kwargs=experience))
    method = config.method
    assert method.rollout_kwargs is method.gen_experience_kwargs
    assert method.rollout_kwargs.model_dump() != method.gen_kwargs.model_dump()
    assert (method.rollout_kwargs.max_new_tokens, method.rollout_kwargs.top_k, method.rollout_kwargs.top_p,
            method.rollout_kwargs.temperature) == (48, 50, 0.9, 0.8)
    assert method.gen_kwargs.max_new_tokens == 40 and method.gen_kwargs.top_k == 0
    assert any("gen_experience_kwargs" in n for n in config.translation.notes)


@pytest.mark.parametrize("name", ["ppoconfig", "PPOConfig", "PPOCONFIG", "ppo"])
def test_method_name_any_case(name):
    assert load_config(None, base=trlx_dict(method__name=name)).method.name == "ppoconfig"


@pytest.mark.parametrize("name, kwargs, cls", [
    ("adam", {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-6}, torch.optim.Adam),
    ("sgd", {"lr": 1e-2, "momentum": 0.9}, torch.optim.SGD),
    ("AdamW", {"lr": 1e-4}, torch.optim.AdamW),
])
def test_optimizer_variants(name, kwargs, cls):
    config = load_config(None, base=trlx_dict(optimizer={"name": name, "kwargs": kwargs}))
    assert config.optimizer.name == name.lower() and as_yaml_data(config.optimizer.torch_kwargs()) == kwargs
    assert isinstance(config.optimizer.build([torch.nn.Parameter(torch.zeros(1))]), cls)


def test_optimizer_kwargs_that_do_not_fit_are_refused():
    # trlX's default kwargs (betas) do not fit SGD: torch refuses them, so does validation.
    with pytest.raises(ValidationError, match="optimizer.kwargs do not fit"):
        load_config(None, base=trlx_dict(optimizer__name="sgd"))


def test_linear_scheduler_with_trlx_linearlr_kwargs():
    kwargs = {"start_factor": 1.0, "end_factor": 0.1, "total_iters": 1600}
    config = load_config(None, base=trlx_dict(scheduler={"name": "linear", "kwargs": kwargs}))
    assert config.scheduler.name == "linear" and config.scheduler.kwargs.model_dump() == kwargs
    optimizer = config.optimizer.build([torch.nn.Parameter(torch.zeros(1))])
    scheduler = config.scheduler.build(optimizer, 1600)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LinearLR)
    assert (scheduler.start_factor, scheduler.end_factor, scheduler.total_iters) == (1.0, 0.1, 1600)


def test_scheduler_name_any_case():
    assert load_config(None, base=trlx_dict(scheduler__name="Cosine_Annealing")).scheduler.name == "cosine_annealing"


def test_extra_generate_kwargs_pass_through():
    gen = {"max_new_tokens": 40, "top_k": 0, "top_p": 1.0, "do_sample": True, "temperature": 0.7, "min_length": 5,
           "repetition_penalty": 1.2}
    dumped = load_config(None, base=trlx_dict(method__gen_kwargs=gen)).method.gen_kwargs.model_dump()
    for key, value in gen.items():
        assert dumped[key] == value, key


@pytest.mark.parametrize("extra, message", [({"no_such_setting": 1}, "not generate.. settings: no_such_setting"),
                                            ({"num_return_sequences": 4}, "num_return_sequences must be 1")])
def test_generate_kwargs_that_cannot_work_are_refused_at_load(extra, message):
    """Checked when the file loads, not when the first rollout would crash."""
    gen = {"max_new_tokens": 40, "top_k": 0, "top_p": 1.0, "do_sample": True, **extra}
    with pytest.raises(ValueError, match=message):
        load_config(None, base=trlx_dict(method__gen_kwargs=gen))


def test_checked_keys_with_their_one_value_are_accepted_and_dropped():
    data = trlx_dict(model__model_arch_type="Causal", tokenizer__padding_side="LEFT", model__peft_config=None,
                     model__model_extra_configs={}, tokenizer__tokenizer_extra_configs={},
                     method__num_value_layers_unfrozen=0, train__resume_from_checkpoint=None)
    translation = trlx_format.translate(data, "x.yaml")
    for key in trlx_format.MUST_BE:
        section, name = key.split(".")
        assert name not in translation.config.get(section, {}), key
    for key in IGNORED:
        section, name = key.split(".")
        assert name not in translation.config.get(section, {}), key
    assert data == trlx_dict(model__model_arch_type="Causal", tokenizer__padding_side="LEFT")  # input untouched


def test_missing_num_layers_unfrozen_is_trlx_default_minus_one():
    config = load_config(None, base=trlx_dict(model__num_layers_unfrozen=...))
    assert config.model.num_layers_unfrozen == -1
    assert any("num_layers_unfrozen -1" in n and "every parameter trains" in n for n in config.translation.notes)


# 6. Overrides on a trlX file are in trlX's units.

def test_overrides_are_in_trlx_units(default_yaml):
    config = load_config(default_yaml, ["train.total_steps=320"])
    assert config.train.total_steps == 20  # 320 optimizer steps / 16
    assert any("320 optimizer steps" in n and "20 PPO iterations" in n for n in config.translation.notes)
    config = load_config(default_yaml, ["train.eval_interval=32", "train.checkpoint_interval=160"])
    assert config.train.eval_interval == 2 and config.train.checkpoint_interval == 10
    config = load_config(default_yaml, ["train.epochs=5"])
    assert config.train.total_steps == 5


def test_engine_override_passes_through(default_yaml):
    config = load_config(default_yaml, ["train.engine=trlx"])
    assert config.train.engine == "trlx" and config.translation is not None
    assert config.train.total_steps == 100


# 7. The project's own sections and keys beside trlX's.

def test_project_sections_and_keys_survive_translation(tmp_path):
    data = trlx_dict(train__torch_threads=3, train__keep_checkpoints=2)
    data["reward"] = {"url": "http://reward:9000", "timeout_s": 30}
    data["data"] = {"source": "imdb", "eval_prompts": 8}
    data["generator"] = {"url": "http://gen:8001"}
    config = load_config(write_yaml(tmp_path, data))
    assert config.translation is not None
    assert config.reward.url == "http://reward:9000" and config.reward.timeout_s == 30
    assert config.data.source == "imdb" and config.data.eval_prompts == 8
    assert config.generator.url == "http://gen:8001"
    assert config.train.torch_threads == 3 and config.train.keep_checkpoints == 2
    assert config.train.total_steps == 100


# 8. configs/ppo_sentiments.yaml is trlX's default_ppo_config() plus reward and data.

def test_ppo_sentiments_yaml_is_exactly_trlx_default(monkeypatch):
    monkeypatch.delenv("POLICY_MODEL", raising=False)
    raw = yaml.safe_load((ROOT / "configs" / "ppo_sentiments.yaml").read_text())
    assert raw["model"]["model_path"] == "${POLICY_MODEL:-lvwerra/gpt2-imdb}"
    expanded = expand_env(raw)
    expected = as_yaml_data(TRLX_DEFAULT_PPO)
    differences = [d for section in TRLX_SECTIONS for d in _diff(expanded[section], expected[section], section)]
    assert differences == []
    assert set(raw) - set(TRLX_SECTIONS) == {"reward", "data"}
    assert list(raw)[:6] == list(TRLX_SECTIONS)  # to_dict order
    for section in TRLX_SECTIONS:
        assert list(raw[section]) == list(TRLX_DEFAULT_PPO[section]), section


def test_ppo_sentiments_loads_to_100_iterations(monkeypatch):
    monkeypatch.delenv("POLICY_MODEL", raising=False)
    config = load_config(ROOT / "configs" / "ppo_sentiments.yaml")
    assert config.translation is not None
    assert config.train.total_steps == 100 and config.train.eval_interval == 6.25
    assert config.model.model_path == "lvwerra/gpt2-imdb"
    assert config.data.source == "imdb"
    assert config.train.run_name == "ppo_sentiments" and config.train.checkpoint_dir == Path("ckpts")


def test_ppo_sentiments_policy_model_env(monkeypatch):
    monkeypatch.setenv("POLICY_MODEL", "/models/gpt2-imdb")
    assert load_config(ROOT / "configs" / "ppo_sentiments.yaml").model.model_path == "/models/gpt2-imdb"


# 9. This project's own format is not trlX's.

def test_native_file_is_not_translated(monkeypatch):
    monkeypatch.delenv("TOTAL_STEPS", raising=False)
    config = load_config(ROOT / "configs" / "tiny.yaml")
    assert config.translation is None
    assert config.train.total_steps == 40 and config.train.eval_interval == 5  # iterations, as written
    assert not trlx_format.is_trlx_config(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))


@pytest.mark.parametrize("key", ["bogus", "rollout_logging_dir", "save_best"])
def test_native_file_with_an_unknown_key_fails_validation(key):
    base = {"model": {"model_path": "x"}, "train": {"total_steps": 3, key: "wandb"}}
    with pytest.raises(ValidationError, match=key):
        load_config(None, base=base)


@pytest.mark.parametrize("marker", trlx_format.TRLX_TRAIN_MARKERS)
def test_each_marker_makes_a_file_trlx(marker):
    assert trlx_format.is_trlx_config({"train": {marker: 1}})
    assert not trlx_format.is_trlx_config({"train": {"total_steps": 1}})
    assert not trlx_format.is_trlx_config({"train": None})


# 10. trlX's tracking keys: tracker (any of this project's four), logging_dir, project_name, entity_name, group_name
# and tags keep their names and meanings.

def test_tracking_keys_keep_their_meaning(monkeypatch, tmp_path):
    monkeypatch.setattr(trackers, "installed", lambda name: True)
    config = load_config(None, base=trlx_dict(
        train__tracker="tensorboard", train__logging_dir=str(tmp_path / "logs"), train__project_name="sentiments",
        train__entity_name="team", train__group_name="sweep-1", train__tags=["gpt2", "imdb"]))
    t = config.train
    assert (t.tracker, t.logging_dir, t.project_name) == (["tensorboard"], tmp_path / "logs", "sentiments")
    assert (t.entity_name, t.group_name, t.tags) == ("team", "sweep-1", ["gpt2", "imdb"])
    assert not set(config.translation.ignored) & {f"train.{key}" for key in TRACKING_KEYS}
    assert any("tracker 'tensorboard' -> tensorboard (project 'sentiments'" in n for n in config.translation.notes)
    assert any("logging_dir" in n and "tensorboard/<run_name>" in n for n in config.translation.notes)


def test_trlx_default_tracker_wandb_logs_to_wandb(monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda name: True)
    config = load_config(None, base=trlx_dict())
    assert config.train.tracker == ["wandb"] and config.train.project_name == "trlx"
    assert config.train.logging_dir is None and config.train.entity_name is None and config.train.tags == []


def test_trlx_tracker_null_is_no_tracker():
    assert load_config(None, base=trlx_dict(train__tracker=None)).train.tracker == []


def test_a_trlx_tracker_not_installed_here_is_a_note_not_a_refusal(monkeypatch):
    """trlX writes `tracker: wandb` into every config (its default): without wandb the run still starts."""
    monkeypatch.setattr(trackers, "installed", lambda name: name != "wandb")
    config = load_config(None, base=trlx_dict())
    assert config.train.tracker == ["tensorboard"]  # this project's default
    (note,) = [n for n in config.translation.notes if n.startswith("tracker 'wandb'")]
    assert "wandb not installed here" in note and trackers.INSTALL_HINT in note
    both = load_config(None, base=trlx_dict(train__tracker="mlflow,wandb"))
    assert both.train.tracker == ["mlflow"]


def test_a_trlx_tracker_unknown_here_is_refused():
    with pytest.raises(TrlxConfigError, match="train.tracker: unknown tracker 'comet_ml'"):
        load_config(None, base=trlx_dict(train__tracker="comet_ml"))
