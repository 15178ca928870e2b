"""The checkpoint layout shared by the trainer (writes) and the generator (reads).

`<root>/<run>/step-<N>/` holds `save_pretrained` output (safetensors), tokenizer files and `manifest.json`
(step, metrics, time, config). A checkpoint is written under a hidden temporary name with the manifest last, then
renamed: the rename is the commit, so a reader never sees a half-written checkpoint under a real name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{1,12})$")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CHECKPOINT_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,127})/step-(\d{1,12})$")


class CheckpointNameError(ValueError):
    """A name that is not `<run>/step-<N>` or that would leave the checkpoint root."""


@dataclass
class CheckpointInfo:
    name: str  # "<run>/step-<N>"
    path: Path
    run: str
    step: int
    time: float
    metrics: dict[str, Any] = field(default_factory=dict)
    valid: bool = True
    error: str | None = None


def checkpoint_path(root: Path, name: str) -> Path:
    """The folder of checkpoint `name` under `root`; refuses anything that could escape it."""
    match = CHECKPOINT_NAME.fullmatch(name)
    if not match or ".." in name:
        raise CheckpointNameError(f"invalid checkpoint name {name!r}: expected '<run>/step-<N>' "
                                  "(letters, digits, '.', '_', '-')")
    root = root.resolve()
    path = (root / match.group(1) / f"step-{int(match.group(2))}").resolve()
    if root not in path.parents:
        raise CheckpointNameError(f"checkpoint name {name!r} leaves the checkpoint folder")
    return path


def _check_safetensors(path: Path) -> str | None:
    """A cheap integrity check: the header parses and the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return f"{path.name}: header longer than the file"
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            return f"{path.name}: truncated ({size} bytes, header promises {8 + header_len + end})"
    except (OSError, struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{path.name}: unreadable ({type(exc).__name__})"
    return None


def check_model_folder(path: Path) -> str | None:
    """None when `path` looks like a loadable HF model folder, else what is wrong."""
    if not (path / "config.json").is_file():
        return "config.json is missing"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            return f"bad weight index: {exc}"
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return "no safetensors weights"
    for shard in shards:
        if not (path / shard).is_file():
            return f"weights shard {shard} is missing"
        if problem := _check_safetensors(path / shard):
            return problem
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return "tokenizer files are missing"
    return None


def read_checkpoint(root: Path, run: str, step_dir: Path) -> CheckpointInfo | None:
    """The checkpoint in `step_dir`, or None while it is incomplete (no manifest yet)."""
    match = STEP_DIR.fullmatch(step_dir.name)
    manifest_path = step_dir / MANIFEST
    if not match or not RUN_NAME.fullmatch(run) or not manifest_path.is_file():
        return None
    name = f"{run}/step-{int(match.group(1))}"
    try:
        manifest = json.loads(manifest_path.read_text())
        step = int(manifest.get("step", match.group(1)))
        made = float(manifest.get("time", manifest_path.stat().st_mtime))
        metrics = manifest.get("metrics") or {}
    except (OSError, ValueError, TypeError) as exc:
        return CheckpointInfo(name, step_dir, run, int(match.group(1)), 0.0, valid=False,
                              error=f"bad manifest: {exc}")
    problem = check_model_folder(step_dir)
    return CheckpointInfo(name, step_dir, run, step, made, metrics, valid=problem is None, error=problem)


def scan_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Every complete checkpoint under `root`, oldest first. Hidden (temporary) folders are skipped."""
    found: list[CheckpointInfo] = []
    if not root.is_dir():
        return found
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for step_dir in run_dir.iterdir():
            if step_dir.is_dir() and not step_dir.name.startswith("."):
                info = read_checkpoint(root, run_dir.name, step_dir)
                if info is not None:
                    found.append(info)
    found.sort(key=lambda c: (c.time, c.step))
    return found


def write_checkpoint(root: Path, run: str, step: int, save: Callable[[Path], None], *,
                     metrics: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically: `save(tmp)` fills a hidden folder, the manifest goes last, then the rename.

    Re-writing an existing step replaces it (the old folder is moved aside first, then deleted).
    """
    if not RUN_NAME.fullmatch(run):
        raise CheckpointNameError(f"invalid run name {run!r}")
    run_dir = root / run
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step}"
    tmp = run_dir / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save(tmp)
    manifest = {"step": step, "time": time.time(), "metrics": metrics or {}, "config": config or {}}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        old = run_dir / f".step-{step}.old-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(final)
    return final
