"""How a checkpoint is committed: fsynced before its manifest, never deleted before its replacement is in place, and
what a writer killed half-way leaves behind is repaired (or removed) at the next start."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.checkpoints import (
    MANIFEST,
    CheckpointWriteError,
    recover_checkpoints,
    remove_checkpoint,
    scan_checkpoints,
    write_checkpoint,
)
from tests.conftest import ROOT


def fill(text: str):
    """A save function writing two files, one in a sub-folder, as save_pretrained may."""

    def save(folder: Path) -> None:
        (folder / "weights.bin").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "extra.json").write_text(text)

    return save


def hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_every_file_and_folder_is_fsynced_before_the_manifest_and_the_parent_after_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    final = write_checkpoint(tmp_path, "run", 3, fill("v1"))
    tmp = str(tmp_path / "run" / f".step-3.tmp-{os.getpid()}")
    manifest_at = synced.index(f"{tmp}/{MANIFEST}")
    before = set(synced[:manifest_at])
    assert {f"{tmp}/weights.bin", f"{tmp}/sub/extra.json", f"{tmp}/sub", tmp} <= before
    assert f"{tmp}" in synced[manifest_at + 1:]  # the manifest's folder entry too
    assert synced[-1] == str(tmp_path / "run")  # the rename itself is made durable last
    assert (final / "weights.bin").read_text() == "v1" and (final / MANIFEST).is_file()


def test_rewriting_a_step_keeps_the_old_one_until_the_new_one_is_committed(tmp_path):
    write_checkpoint(tmp_path, "run", 3, fill("v1"))
    seen: list[str] = []

    def save(folder: Path) -> None:
        seen.append((tmp_path / "run" / "step-3" / "weights.bin").read_text())  # still there while we write
        fill("v2")(folder)

    final = write_checkpoint(tmp_path, "run", 3, save)
    assert seen == ["v1"] and (final / "weights.bin").read_text() == "v2"
    assert hidden(tmp_path / "run") == []


CRASH_BETWEEN_RENAMES = """
import os, pathlib, sys
from shared.checkpoints import write_checkpoint
real = pathlib.Path.rename
def rename(self, target):
    out = real(self, target)
    if ".old-" in pathlib.Path(target).name:
        os._exit(137)  # killed after the old step was moved aside, before the new one took its name
    return out
pathlib.Path.rename = rename
write_checkpoint(pathlib.Path(sys.argv[1]), "run", 3, lambda d: (d / "weights.bin").write_text("v2"))
"""


def test_a_writer_killed_between_the_two_renames_loses_nothing(tmp_path):
    write_checkpoint(tmp_path, "run", 3, fill("v1"))
    proc = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(tmp_path)], cwd=ROOT)
    assert proc.returncode == 137
    run_dir = tmp_path / "run"
    assert not (run_dir / "step-3").exists() and len(hidden(run_dir)) == 2  # the .old and the finished .tmp

    actions = recover_checkpoints(run_dir)
    assert (run_dir / "step-3" / "weights.bin").read_text() == "v1"  # the committed step is back
    assert hidden(run_dir) == [] and len(actions) == 2


def test_recovery_removes_dead_writers_leftovers_and_keeps_live_ones(tmp_path):
    run_dir = tmp_path / "run"
    write_checkpoint(tmp_path, "run", 3, fill("v1"))
    gone = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".step-4.tmp-{gone}", f".step-5.tmp-{os.getpid()}", f".step-3.old-{gone}",
                     f".step-7.del-{gone}", f".step-6.tmp-{live.pid}", ".not-ours"):
            (run_dir / name).mkdir()
        recover_checkpoints(run_dir)
        assert hidden(run_dir) == sorted([f".step-6.tmp-{live.pid}", ".not-ours"])
    finally:
        live.kill()
        live.wait()
    assert (run_dir / "step-3" / "weights.bin").read_text() == "v1"  # a step with an .old beside it is the newer


def test_a_full_disk_leaves_no_partial_checkpoint_and_says_so(tmp_path):
    write_checkpoint(tmp_path, "run", 3, fill("v1"))

    def full_disk(folder: Path) -> None:
        (folder / "weights.bin").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for step in (3, 4):  # a rewrite of a committed step, and a new step
        with pytest.raises(CheckpointWriteError, match=f"run/step-{step}.*No space left") as failure:
            write_checkpoint(tmp_path, "run", step, full_disk)
        assert failure.value.errno == errno.ENOSPC
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["step-3"]
    assert (run_dir / "step-3" / "weights.bin").read_text() == "v1"


def test_a_removed_checkpoint_vanishes_at_once(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, "run", 3, fill("v1"))
    seen_during_delete: list[list[str]] = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kw):  # what a reader sees while the files go
        seen_during_delete.append([c.name for c in scan_checkpoints(tmp_path)])
        return real_rmtree(path, *args, **kw)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    remove_checkpoint(tmp_path / "run" / "step-3")
    assert seen_during_delete == [[]] and list((tmp_path / "run").iterdir()) == []
