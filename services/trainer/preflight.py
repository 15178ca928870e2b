"""What a run may do before it loads anything: resume, refuse because it already finished, or refuse because its
config no longer fits its checkpoints. Reads manifests (and the index of a trainer-state archive) only, so that a
refusal comes at once, not after a model loads."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

from services.trainer.checkpointing import TRAINER_STATE, best_checkpoint, resume_candidates
from services.trainer.config import TrainerConfig
from shared.checkpoints import MANIFEST, CheckpointInfo

log = logging.getLogger(__name__)

# The config keys (a key, or a section prefix) whose change breaks a resume, and why. A checkpoint holds weights, a
# value head and optimizer, scheduler, KL-controller and data state: a key breaks resume when a new value would change
# what those mean or how they load, or would be silently overridden by what the checkpoint restores. Everything else
# (total_steps, eval and checkpoint intervals, batch and rollout sizes, PPO coefficients, sampling, data, reward and
# generator services, precision, threads) is a setting the resumed run may change: it applies from the next iteration.
RESUME_BREAKING = {
    "model.model_path": "the weights are a fine-tune of this model, and the KL reference is rebuilt from it",
    "model.revision": "the weights are a fine-tune of this revision, and the KL reference is rebuilt from it",
    "tokenizer.tokenizer_path": "token ids would mean other tokens to the saved weights",
    "model.value_head_hidden": "the saved value head has the old width",
    "method.num_value_layers_unfrozen": "the saved value head sits where the old value says",
    "model.num_layers_unfrozen": "the optimizer state holds exactly the old unfrozen parameters",
    "optimizer": "the checkpoint restores the optimizer with its own state and hyper-parameters",
    "scheduler": "the checkpoint restores the schedule with its own kind and settings",
    "train.engine": "each engine writes and reads its own trainer state",
}
PATH_KEYS = ("model.model_path", "tokenizer.tokenizer_path")  # two spellings of one folder are the same model


class RunRefused(ValueError):
    """The run cannot start as configured; the message says why and what to do instead."""


class RunFinished(RunRefused):
    """The run already reached train.total_steps: there is nothing to train."""

    def __init__(self, message: str, *, step: int | None = None, checkpoint: str | None = None,
                 best: str | None = None):
        super().__init__(message)
        self.step, self.checkpoint, self.best = step, checkpoint, best


class ResumeConflict(RunRefused):
    """The run's checkpoint was written with a config that the new one changes in keys that break resume."""


def check_run(config: TrainerConfig) -> None:
    """Raise ResumeConflict or RunFinished when `config` resumes a run that it cannot continue; return otherwise
    (nothing to resume, train.resume off, or a resume that works)."""
    if not config.train.resume:
        return
    complete = [c for c in resume_candidates(config.run_dir) if c.valid]
    if not complete:
        return
    t, newest, saved = config.train, complete[0], _saved_config(complete[0].path)
    changed = resume_conflicts(saved, config.model_dump(mode="json"))
    if changed:
        listed = "\n".join(f"  {key}: {old!r} -> {new!r} ({RESUME_BREAKING[rule]})" for key, rule, old, new in changed)
        raise ResumeConflict(
            f"run {t.run_name!r} cannot resume from {newest.name} in {config.run_dir}: the config changed in keys "
            f"that the checkpoint depends on:\n{listed}\n{_how_to_proceed('train it from scratch with this config')}"
            " To resume instead, undo these changes.")
    reached = next((c for c in complete if _reached(c)), None)
    if reached is not None and reached.step >= t.total_steps:
        best = best_checkpoint(config.run_dir)
        raise RunFinished(
            f"run {t.run_name!r} already finished: step {reached.step}/{t.total_steps} in {config.run_dir} (best: "
            f"{best or 'none'}). {_how_to_proceed('train it again from scratch')} To train it further, raise "
            "train.total_steps.", step=reached.step, checkpoint=reached.name, best=best)
    _warn_about_kept_schedule(config, saved, newest.step)


def _reached(checkpoint: CheckpointInfo) -> bool:
    """Whether the run got to this complete checkpoint's step, as far as metadata tells: a native checkpoint needs a
    whole trainer-state archive (torch.save writes a zip: its index is read, no tensor), without which a resume
    skips it; the trlX engine saves none (it cannot resume), so its checkpoints count as they are."""
    if zipfile.is_zipfile(checkpoint.path / TRAINER_STATE):
        return True
    train = _saved_config(checkpoint.path).get("train")
    return isinstance(train, dict) and train.get("engine") == "trlx"


def _how_to_proceed(fresh: str) -> str:
    return (f"To {fresh} add --fresh (`--set train.resume=false`; the old run folder is kept aside); to keep it and "
            "start another run, pass --run-name NAME (`--set train.run_name=NAME`).")


def _saved_config(checkpoint: Path) -> dict:
    """The config a checkpoint was written with, in this project's format ({} when it has none)."""
    from services.trainer.trlx_format import is_trlx_config, translate

    try:
        saved = json.loads((checkpoint / MANIFEST).read_text()).get("config") or {}
        return translate(saved).config if is_trlx_config(saved) else saved if isinstance(saved, dict) else {}
    except (OSError, ValueError, AttributeError):  # unreadable: nothing to compare, as for an old checkpoint
        return {}


def resume_conflicts(saved: dict, new: dict) -> list[tuple[str, str, Any, Any]]:
    """(key, the rule it falls under, saved value, new value) for each breaking key that differs. A key that either
    config lacks (a checkpoint written before the key existed) is not compared."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    changed = []
    for key in sorted(old_flat.keys() & new_flat.keys()):
        rule = next((r for r in RESUME_BREAKING if key == r or key.startswith(r + ".")), None)
        old, new_value = old_flat[key], new_flat[key]
        if key == "tokenizer.tokenizer_path" and (old is None) != (new_value is None):
            # unset, it is the model's: compare the tokenizer used (unset on both sides, it follows the model key)
            old, new_value = old or old_flat.get("model.model_path"), new_value or new_flat.get("model.model_path")
        if rule and not _same(key, old, new_value):
            changed.append((key, rule, old, new_value))
    return changed


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str) and Path(old).exists():
        return Path(old).resolve() == Path(new).resolve()
    return False


def _warn_about_kept_schedule(config: TrainerConfig, saved: dict, step: int) -> None:
    """A run extended by raising total_steps resumes, but a learning-rate schedule restored from the checkpoint keeps
    the length it was saved with."""
    old_total = saved.get("train", {}).get("total_steps") if isinstance(saved.get("train"), dict) else None
    if config.scheduler.name != "constant" and old_total not in (None, config.train.total_steps):
        log.warning("resuming at step %d with train.total_steps %s -> %d: the %s learning-rate schedule continues "
                    "as the checkpoint saved it, with its old length", step, old_total, config.train.total_steps,
                    config.scheduler.name)
