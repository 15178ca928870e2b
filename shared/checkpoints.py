"""The checkpoint layout shared by the trainer (writes) and the generator (reads).

`<root>/<run>/step-<N>/` holds `save_pretrained` output (safetensors), tokenizer files and `manifest.json`
(step, metrics, time, config). A checkpoint is written under a hidden temporary name with the manifest last, then
renamed: the rename is the commit, so a reader never sees a half-written checkpoint under a real name.
"""

from __future__ import annotations

import json
import math
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
# Names are canonical: ASCII digits without leading zeros (`\d` would take `step-１０`, int() would read `step-010`),
# so one checkpoint has one name and one folder.
_STEP = r"step-(0|[1-9][0-9]{0,11})"
STEP_DIR = re.compile(rf"^{_STEP}$")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CHECKPOINT_NAME = re.compile(rf"^([A-Za-z0-9][A-Za-z0-9_.-]{{0,127}})/{_STEP}$")
MAX_MANIFEST_BYTES = 1 << 20  # a trainer's manifest is a few kB; a bigger one is not read into memory


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
        raise CheckpointNameError(f"invalid checkpoint name {name[:200]!r}: expected '<run>/step-<N>' (run: letters, "
                                  "digits, '.', '_', '-'; N: ASCII digits without leading zeros)")
    root = root.resolve()
    path = root / match.group(1) / f"step-{match.group(2)}"
    if path.resolve() != path:  # a symlinked run or step folder may lead anywhere: never followed
        raise CheckpointNameError(f"checkpoint {name!r} is a symbolic link; only real folders are served")
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
    try:
        if not match or not RUN_NAME.fullmatch(run) or not manifest_path.is_file():
            return None
    except OSError:  # an unreadable folder is no checkpoint
        return None
    name = f"{run}/step-{match.group(1)}"
    try:
        if link := _link_out(root, step_dir):
            raise ValueError(f"{link} is a symbolic link out of the checkpoint folder")
        step, made, metrics = _read_manifest(manifest_path, int(match.group(1)))
    except (OSError, ValueError, TypeError, OverflowError, RecursionError) as exc:  # RecursionError: deep nesting
        return CheckpointInfo(name, step_dir, run, int(match.group(1)), 0.0, valid=False,
                              error=f"bad checkpoint: {str(exc)[:200]}")
    problem = check_model_folder(step_dir)
    return CheckpointInfo(name, step_dir, run, step, made, metrics, valid=problem is None, error=problem)


def _read_manifest(path: Path, step: int) -> tuple[int, float, dict[str, Any]]:
    """Step, time and metrics of a manifest; ValueError (or OSError) for anything malformed."""
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST} is not a JSON object")
    made = float(manifest.get("time", path.stat().st_mtime))
    metrics = manifest.get("metrics") or {}
    if not math.isfinite(made) or not isinstance(metrics, dict):
        raise ValueError(f"{MANIFEST} has a non-finite time or metrics that are not an object")
    return int(manifest.get("step", step)), made, metrics


def _link_out(root: Path, folder: Path) -> str | None:
    """The name of the first entry of `folder` that is a symbolic link leading out of `root`, if any."""
    root = root.resolve()
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink() and root not in Path(entry.path).resolve().parents:
                return entry.name
    return None


def _subfolders(folder: Path) -> list[os.DirEntry]:
    """The real (not symlinked), not hidden sub-folders of `folder`; none when it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def scan_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Every complete checkpoint under `root`, oldest first. Hidden (temporary) folders are skipped."""
    found: list[CheckpointInfo] = []
    for run_dir in sorted(_subfolders(root), key=lambda e: e.name):
        if not RUN_NAME.fullmatch(run_dir.name):  # e.g. lost+found: never a run, never read
            continue
        for step_dir in _subfolders(Path(run_dir.path)):
            if (info := read_checkpoint(root, run_dir.name, Path(step_dir.path))) is not None:
                found.append(info)
    found.sort(key=lambda c: (c.time, c.step))
    return found


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, ...): nothing was left under a real name, older ones are untouched."""


WORK_DIR = re.compile(r"^\.step-([0-9]{1,12})\.(tmp|old|del)-([0-9]+)$")  # being written, replaced, deleted


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (new names, renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then each folder (deepest first)."""
    for dirpath, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves either the old or the new content, both durable."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_synced(tmp, text)
    os.replace(tmp, path)
    _fsync(path.parent)


def _commit(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. An existing `final` is moved aside and deleted only once its replacement is in place
    and durable: a crash in between leaves the `.old` folder, which `recover_checkpoints` renames back."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if old.exists():
            old.rename(final)
        raise
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(root: Path, run: str, step: int, save: Callable[[Path], None], *,
                     metrics: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically and durably: `save(tmp)` fills a hidden folder, every file in it is fsynced, then
    the manifest is written (and fsynced) last, then the rename commits, then the parent folder is fsynced.

    On any failure the hidden folder is removed and the error says so (CheckpointWriteError for OSError, e.g. a full
    disk): no half checkpoint is ever visible under a real name. Re-writing an existing step replaces it safely.
    """
    if not RUN_NAME.fullmatch(run):
        raise CheckpointNameError(f"invalid run name {run!r}")
    run_dir = root / run
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step}"
    tmp = run_dir / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save(tmp)
        _fsync_tree(tmp)  # the data is on the disk before the manifest that vouches for it
        manifest = {"step": step, "time": time.time(), "metrics": metrics or {}, "config": config or {}}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
        _fsync(tmp)
        _commit(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointWriteError):
            raise CheckpointWriteError(exc.errno, f"could not write checkpoint {run}/step-{step} under {root}: "
                                       f"{exc.strerror or exc}; no partial checkpoint was left, older ones are "
                                       "intact") from exc
        raise
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a step folder so that it vanishes at once: renamed to a hidden name first, so a deletion cut short
    never leaves a half checkpoint under its real name (`recover_checkpoints` finishes it)."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    path.rename(doomed)
    _fsync(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # a restarted container reuses pids: at start, our pid's leftovers are a dead run's
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_checkpoints(run_dir: Path) -> list[str]:
    """Undo what writers that died mid-save left in `run_dir`; call at start, before writing. Returns what it did.

    A `.step-N.old-<pid>` whose `step-N` is missing (killed between the two renames of a replacement) is renamed
    back; other `.old` folders and the `.tmp` and `.del` folders of dead processes are deleted. Live writers'
    folders stay.
    """
    actions: list[str] = []
    if not run_dir.is_dir():
        return actions
    for path in sorted(run_dir.iterdir()):
        match = WORK_DIR.fullmatch(path.name)
        if not match or not path.is_dir() or _alive(int(match.group(3))):
            continue
        final = run_dir / f"step-{int(match.group(1))}"
        if match.group(2) == "old" and not final.exists():
            path.rename(final)
            actions.append(f"restored {final.name} from {path.name}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed {path.name}")
    if actions:
        _fsync(run_dir)
    return actions
