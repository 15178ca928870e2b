"""trlX config files, read unchanged: the YAML of any trlX `TRLConfig` for PPO becomes this project's config.

A file is in trlX's format when its `train` section has one of the keys trlX requires there and this project has not
(`epochs`, `trainer`, `pipeline`). Every trlX key with a meaning here is translated into this project's units (trlX
counts `total_steps`, `eval_interval` and `checkpoint_interval` in optimizer steps, this project in PPO iterations);
trlX-only keys with no meaning here are accepted and listed in one warning; what cannot be honoured is refused with
the reason. The project's own sections (reward, data, generator) and keys may sit beside trlX's in the same file.
docs/trlx.md has the table of every key.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRLX_TRAIN_MARKERS = ("epochs", "trainer", "pipeline")

# trlX keys accepted with no effect here, and why (the warning and docs/trlx.md say so).
IGNORED = {
    "train.pipeline": "prompts come from the data section",
    "train.trainer": "train.engine picks the engine: native, or trlX's own trainer",
    "train.trainer_kwargs": "no trainer class to pass them to",
    "train.rollout_logging_dir": "rollouts are not exported",
    "train.save_best": "best.json always names the best checkpoint",
    "train.save_optimizer": "checkpoints always hold the optimizer state, so that a run resumes exactly",
    "train.minibatch_size": "each batch_size minibatch is one step here, without gradient accumulation",
}
# trlX values that are accepted only when they mean what this project does (value, then why others are refused).
MUST_BE = {
    "model.model_arch_type": ("causal", "only causal language models are trained (seq2seq is not supported)"),
    "model.peft_config": (None, "PEFT adapters are not supported: use model.num_layers_unfrozen to train fewer "
                                "parameters"),
    "model.model_extra_configs": ({}, "extra from_pretrained arguments are not supported"),
    "tokenizer.tokenizer_extra_configs": ({}, "extra tokenizer arguments are not supported"),
    "tokenizer.padding_side": ("left", "prompts must be left-padded for generation"),
    "train.resume_from_checkpoint": (None, "a run resumes from its own checkpoints (train.resume); a trlX "
                                           "checkpoint folder cannot be loaded"),
    "method.num_value_layers_unfrozen": (0, "only a value head on the policy's last hidden state is supported"),
}
METHOD_NAMES = ("ppoconfig", "ppo")
SCHEDULERS = ("cosine_annealing", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")


class TrlxConfigError(ValueError):
    """A trlX config this project cannot honour; the message says which key and why."""


@dataclass
class Translation:
    """The project's config dict, what the translation did (printed at the start of a run), and what it ignored."""

    config: dict
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def log(self, logger) -> None:
        for note in self.notes:
            logger.info("trlX config: %s", note)
        if self.ignored:
            by_reason: dict[str, list[str]] = {}
            for key in self.ignored:
                by_reason.setdefault(IGNORED[key], []).append(key)
            logger.warning("trlX config: keys with no effect here: %s",
                           "; ".join(f"{', '.join(keys)}: {why}" for why, keys in by_reason.items()))


def is_trlx_config(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("train"), dict) and \
        any(key in data["train"] for key in TRLX_TRAIN_MARKERS)


def _get(data: dict, dotted: str, default: Any = None) -> Any:
    section, key = dotted.split(".")
    return (data.get(section) or {}).get(key, default)


def _pop(data: dict, dotted: str) -> Any:
    section, key = dotted.split(".")
    return (data.get(section) or {}).pop(key, None)


def _positive_int(data: dict, dotted: str) -> int:
    value = _get(data, dotted, None)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrlxConfigError(f"{dotted} must be a positive whole number (trlX requires it), got {value!r}")
    return value


def translate(data: dict, source: str | Path | None = None) -> Translation:
    """The project's config for trlX config `data` (as `TRLConfig.to_dict()` or a trlX YAML file has it)."""
    data = copy.deepcopy(data)
    for section in ("train", "model", "tokenizer", "optimizer", "scheduler", "method"):
        if not isinstance(data.get(section, {}), dict):
            raise TrlxConfigError(f"{section} must be a section (a mapping)")
    _refuse_what_cannot_be_honoured(data)
    out = Translation(config=data)
    train, method = data["train"], data.setdefault("method", {})

    batch_size = _positive_int(data, "train.batch_size")
    rollouts = _positive_int(data, "method.num_rollouts")
    ppo_epochs = _positive_int(data, "method.ppo_epochs")
    if rollouts % batch_size:
        raise TrlxConfigError(f"method.num_rollouts ({rollouts}) must be a multiple of train.batch_size "
                              f"({batch_size}): trlX would run a last, smaller minibatch; here every minibatch is "
                              "full")
    per_iteration = ppo_epochs * rollouts // batch_size
    steps, epochs = _positive_int(data, "train.total_steps"), _positive_int(data, "train.epochs")
    iterations = min(epochs, math.ceil(steps / per_iteration))
    capped = "capped by epochs" if epochs * per_iteration < steps else "within epochs"
    out.notes.append(f"total_steps {steps} optimizer steps, {capped} ({epochs}) -> {iterations} PPO iterations of "
                     f"{per_iteration} optimizer steps (ppo_epochs {ppo_epochs} x num_rollouts {rollouts} / "
                     f"batch_size {batch_size})")
    if steps < epochs * per_iteration and steps % per_iteration:
        out.notes.append(f"trlX stops {steps % per_iteration} optimizer steps into iteration {iterations}; here that "
                         "iteration runs whole")
    train["total_steps"] = iterations
    del train["epochs"]
    for key, what in (("eval_interval", "evaluation"), ("checkpoint_interval", "checkpoint")):
        interval = _positive_int(data, f"train.{key}")
        train[key] = interval / per_iteration
        out.notes.append(f"{key} {interval} optimizer steps -> {what} {_points(interval / per_iteration, iterations)}")

    if train.get("run_name") is None:
        train["run_name"] = _run_name(source)
        out.notes.append(f"run_name null -> {train['run_name']!r} (checkpoints in "
                         f"{train.get('checkpoint_dir', 'ckpts')}/{train['run_name']}/step-<N>/)")
    train.setdefault("checkpoint_dir", "ckpts")  # trlX's default
    if "data" not in data:
        out.notes.append("no `data` section: `rlhf train` takes prompts from the default source (the tiny kit's "
                         "corpus); add one, or pass prompts to train() in Python as to trlx.train()")
    _translate_model_and_tokenizer(data, out)
    _translate_method(method, out)
    _translate_tracking(train, out)
    if "mixed_precision" not in train:  # trlX has no such key: its precision comes from accelerate's config
        out.notes.append("train.mixed_precision unset -> auto: forward passes in bf16 where the GPU or CPU computes "
                         "it natively (weights, optimizer and PPO math stay float32); set it to `no` for float32 "
                         "throughout, as trlX runs without an accelerate mixed-precision config")
    data["optimizer"]["name"] = str(data["optimizer"].get("name", "adamw")).lower()
    data["scheduler"]["name"] = str(data["scheduler"].get("name", "cosine_annealing")).lower()
    method["name"] = "ppoconfig"
    for key in MUST_BE:  # checked: each holds the one value that applies here
        _pop(data, key)
    for key in IGNORED:
        section, name = key.split(".")
        if name in data.get(section, {}):
            _pop(data, key)
            out.ignored.append(key)
    return out


def _refuse_what_cannot_be_honoured(data: dict) -> None:
    for key, (allowed, why) in MUST_BE.items():
        value = _get(data, key, allowed)
        if value in (None, {}) and allowed in (None, {}):
            continue
        if isinstance(value, str) and isinstance(allowed, str):
            value = value.lower()
        if value != allowed:
            raise TrlxConfigError(f"{key}: {value!r} cannot be honoured: {why}")
    name = str(_get(data, "method.name", "PPOConfig")).lower()
    if name not in METHOD_NAMES:
        raise TrlxConfigError(f"method.name {name!r}: only trlX's PPOConfig is supported (ILQL, SFT, RFT are not)")
    optimizer = str(_get(data, "optimizer.name", "adamw")).lower()
    if optimizer not in OPTIMIZERS:
        raise TrlxConfigError(f"optimizer.name {optimizer!r}: one of {', '.join(OPTIMIZERS)} (8-bit bitsandbytes "
                              "optimizers are not supported)")
    gen_kwargs = _get(data, "method.gen_kwargs", {}) or {}
    if isinstance(gen_kwargs, dict) and "max_new_tokens" not in gen_kwargs:
        raise TrlxConfigError("method.gen_kwargs.max_new_tokens is required: trlX sizes prompts with it "
                              "(seq_length - max_new_tokens) and fails without it; max_length would count the padded "
                              "prompt too")
    experience = _get(data, "method.gen_experience_kwargs")
    if isinstance(experience, dict) and "max_new_tokens" not in experience:
        raise TrlxConfigError("method.gen_experience_kwargs.max_new_tokens is required: without it trlX samples "
                              "rollouts up to the model's own generation max_length, not gen_kwargs'")
    scheduler = str(_get(data, "scheduler.name", "cosine_annealing")).lower()
    if scheduler not in SCHEDULERS:
        raise TrlxConfigError(f"scheduler.name {scheduler!r}: trlX knows {' and '.join(SCHEDULERS)}")


def _translate_model_and_tokenizer(data: dict, out: Translation) -> None:
    if "num_layers_unfrozen" not in data["model"]:
        data["model"]["num_layers_unfrozen"] = -1  # trlX ModelConfig's default
    n = data["model"]["num_layers_unfrozen"]
    out.notes.append(f"num_layers_unfrozen {n} -> " + (
        "every parameter trains, against a full frozen reference" if n < 0 else
        f"the top {n} blocks, the final norm and an untied output head train; embeddings and lower blocks are "
        f"frozen; the reference is a frozen copy of the top {n} blocks (hydra) on the shared trunk"))


def _translate_method(method: dict, out: Translation) -> None:
    scale = method.get("scale_reward")
    if scale not in (None, "running", "ref"):
        out.notes.append(f"scale_reward {scale!r} -> no scaling (only running and ref scale, as in trlX)")
    if "cliprange_reward" in method and not method["cliprange_reward"]:
        out.notes.append("cliprange_reward 0 -> scores are not clipped (as in trlX)")
    if method.get("gen_experience_kwargs") is not None:
        out.notes.append("gen_experience_kwargs sample the rollouts; gen_kwargs are used for evaluation")


def _translate_tracking(train: dict, out: Translation) -> None:
    """tracker, logging_dir, project_name, entity_name, group_name and tags keep their names and meanings (here: any
    of tensorboard, wandb, mlflow and aim). trlX writes `tracker: wandb` into every config as its default, so a
    tracker not installed here is a note, not a refusal: the run logs to the default (TensorBoard where installed)."""
    from services.trainer.trackers import INSTALL_HINT, missing_trackers, parse_names

    for key in ("logging_dir", "entity_name", "group_name", "tags"):
        if key in train and train[key] is None:
            del train[key]  # null is this project's default too
    if "logging_dir" in train:
        out.notes.append(f"logging_dir {train['logging_dir']!r} -> tracker files under it (tensorboard/<run_name>, "
                         "wandb/, mlflow/, aim/) instead of the run folder")
    if "tracker" not in train:
        return
    raw = train["tracker"]
    try:
        names = parse_names(raw)
    except ValueError as exc:
        raise TrlxConfigError(f"train.tracker: {exc}") from None
    missing = missing_trackers(names)
    if not missing:
        train["tracker"] = names
        offline = "; W&B logs offline without credentials" if "wandb" in names else ""
        out.notes.append(f"tracker {raw!r} -> " + (f"{', '.join(names)} (project {train.get('project_name', 'rlhf')!r}"
                         f"{offline})" if names else "none: metrics.jsonl only"))
        return
    kept = [n for n in names if n not in missing]
    if kept:
        train["tracker"] = kept
    else:
        del train["tracker"]
    out.notes.append(f"tracker {raw!r}: {', '.join(missing)} not installed here, so the run logs to metrics.jsonl and "
                     f"{', '.join(kept) or 'TensorBoard where installed'} ({INSTALL_HINT} to log to "
                     f"{', '.join(missing)} too)")


def _points(interval: float, iterations: int, shown: int = 6) -> str:
    from services.trainer.config import reaches_multiple

    points = [i for i in range(1, iterations + 1) if reaches_multiple(i, interval)]
    if not points or points[-1] != iterations:
        points.append(iterations)
    if len(points) == 1:
        return f"at the end only (iteration {iterations})"
    listed = ", ".join(map(str, points[:shown])) + (f", ... {points[-1]}" if len(points) > shown else "")
    return f"after iterations {listed} (every {interval:g} iterations, and at the end)"


def _run_name(source: str | Path | None) -> str:
    """trlX names an unnamed run after its script; here after the config file (a valid folder name)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source).stem if source else "trlx")
    return (stem if re.match(r"^[A-Za-z0-9]", stem) else f"run_{stem}")[:128]
