"""Training checkpoints in the shared layout, plus what resuming needs (optimizer, scheduler, KL controller, RNG,
data position), the `best` pointer and retention."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from shared.checkpoints import scan_checkpoints, write_checkpoint

TRAINER_STATE = "trainer_state.pt"
BEST = "best.json"


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, state: dict, metrics: dict, config: dict) -> Path:
    """The policy in HF format (what the generator serves) and the trainer state beside it, committed atomically."""

    def save(tmp: Path) -> None:
        policy.base.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / TRAINER_STATE)

    return write_checkpoint(run_dir.parent, run_dir.name, step, save, metrics=metrics, config=config)


def latest_resumable(run_dir: Path) -> Path | None:
    """The newest valid checkpoint of this run that carries trainer state."""
    found = [c for c in scan_checkpoints(run_dir.parent) if c.run == run_dir.name and c.valid
             and (c.path / TRAINER_STATE).is_file()]
    return max(found, key=lambda c: c.step).path if found else None


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=False)


def update_best(run_dir: Path, checkpoint: Path, metric: str, value: float | None) -> str | None:
    """Point `best.json` at `checkpoint` if its `metric` beats the current best; returns the best's name."""
    best_file = run_dir / BEST
    current = json.loads(best_file.read_text()) if best_file.exists() else None
    name = f"{run_dir.name}/{checkpoint.name}"
    if value is not None and (current is None or value > current["value"]
                              or not (run_dir / current["checkpoint"].split("/")[-1]).exists()):
        tmp = best_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"checkpoint": name, "metric": metric, "value": value}))
        os.replace(tmp, best_file)
        return name
    return current["checkpoint"] if current else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints of the run, and the best one (keep 0: keep all)."""
    if keep <= 0:
        return
    best_file = run_dir / BEST
    best = json.loads(best_file.read_text())["checkpoint"].split("/")[-1] if best_file.exists() else None
    steps = sorted((c for c in scan_checkpoints(run_dir.parent) if c.run == run_dir.name), key=lambda c: c.step)
    for c in steps[:-keep]:
        if c.path.name != best:
            shutil.rmtree(c.path, ignore_errors=True)
