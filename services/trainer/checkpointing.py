"""Training checkpoints in the shared layout, plus what resuming needs (optimizer, scheduler, KL controller, RNG,
data position), the `best` pointer and retention.

The trainer state is loaded with `weights_only=True`: a checkpoints volume is shared with other services, so a file
there must never run code when loaded. Everything saved is therefore tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from shared.checkpoints import CheckpointInfo, atomic_write_text, remove_checkpoint, scan_checkpoints, write_checkpoint

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.pt"
BEST = "best.json"


class TrainerStateError(ValueError):
    """A trainer_state.pt that cannot be trusted or used."""


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, state: dict, metrics: dict, config: dict) -> Path:
    """The policy in HF format (what the generator serves) and the trainer state beside it, committed atomically."""

    def save(tmp: Path) -> None:
        policy.base.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / TRAINER_STATE)

    return write_checkpoint(run_dir.parent, run_dir.name, step, save, metrics=metrics, config=config)


def resume_candidates(run_dir: Path) -> list[CheckpointInfo]:
    """This run's complete checkpoints, newest first, the invalid ones included (so that skipping them is said)."""
    return sorted((c for c in scan_checkpoints(run_dir.parent) if c.run == run_dir.name), key=lambda c: c.step,
                  reverse=True)


def load_trainer_state(checkpoint: Path) -> dict:
    """The trainer state of `checkpoint`; TrainerStateError when it is missing, unreadable, refused by the
    weights-only unpickler (it would run code) or not shaped like a trainer state."""
    path = checkpoint / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainerStateError(f"{TRAINER_STATE} is missing") from None
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TrainerStateError(f"{TRAINER_STATE} refused or unreadable ({type(exc).__name__}: {first_line})") \
            from None
    if not (isinstance(state, dict) and isinstance(state.get("shared"), dict) and isinstance(state.get("ranks"), list)
            and state["ranks"]):
        raise TrainerStateError(f"{TRAINER_STATE} is not a trainer state (no shared and per-rank parts)")
    return state


def _read_best(run_dir: Path) -> dict | None:
    """best.json, or None when absent or unreadable (then the next checkpoint with a metric becomes best)."""
    try:
        best = json.loads((run_dir / BEST).read_text())
        return best if isinstance(best, dict) and {"checkpoint", "value"} <= best.keys() else None
    except (OSError, ValueError):
        return None


def best_checkpoint(run_dir: Path) -> str | None:
    """The name (`<run>/step-<N>`) best.json points at, or None."""
    best = _read_best(run_dir)
    return best["checkpoint"] if best else None


def update_best(run_dir: Path, checkpoint: Path, metric: str, value: float | None) -> str | None:
    """Point `best.json` at `checkpoint` if its `metric` beats the current best; returns the best's name."""
    current = _read_best(run_dir)
    name = f"{run_dir.name}/{checkpoint.name}"
    if value is not None and (current is None or value > current["value"]
                              or not (run_dir / current["checkpoint"].split("/")[-1]).exists()):
        atomic_write_text(run_dir / BEST, json.dumps({"checkpoint": name, "metric": metric, "value": value}))
        return name
    return current["checkpoint"] if current else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints of the run, and the best one (keep 0: keep all)."""
    if keep <= 0:
        return
    best = _read_best(run_dir)
    best_dir = best["checkpoint"].split("/")[-1] if best else None
    steps = sorted((c for c in scan_checkpoints(run_dir.parent) if c.run == run_dir.name), key=lambda c: c.step)
    for c in steps[:-keep]:
        if c.path.name != best_dir:
            try:
                remove_checkpoint(c.path)
            except OSError as exc:  # retention is housekeeping: it must never stop a run
                log.warning("could not remove old checkpoint %s: %s", c.name, exc)


def set_aside(run_dir: Path) -> Path | None:
    """Move a run folder that has anything in it to `<run>.replaced-<UTC time>` beside it, so that a run started
    over never mixes with, nor destroys, the old one's checkpoints, metrics and best pointer. The new name is a run
    name too: the generator still serves the old checkpoints under it. Returns the new path (None: nothing there)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    for n in range(2, 1000):  # two restarts within a second
        if not target.exists():
            break
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    run_dir.rename(target)
    log.warning("train.resume is off: the previous contents of %s were moved to %s; this run starts from step 0",
                run_dir, target)
    return target
