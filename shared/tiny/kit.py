"""Where the tiny kit lives and whether it is built: one answer for every command, test and benchmark."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

ENV_VAR = "RLHF_TINY_DIR"
DEFAULT_DIR = Path(".cache") / "tiny"  # under the current directory
REPORT = "report.json"  # the build writes it last: its presence means the kit is complete


def kit_dir() -> Path:
    """The tiny kit's folder: $RLHF_TINY_DIR, else .cache/tiny under the current directory."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def use(kit: Path) -> None:
    """Point `kit_dir()` at `kit` for this process and the processes it starts (data source `tiny` reads its corpus
    there)."""
    os.environ[ENV_VAR] = str(kit)


def is_built(kit: Path, needed: Sequence[str] = ()) -> bool:
    """The build has completed in `kit`, and each of the `needed` paths (relative to it) is there: a kit built
    before an artefact was added lacks it, and building again adds it (reusing the rest)."""
    return (kit / REPORT).is_file() and all((kit / rel).exists() for rel in needed)


def ensure_built(kit: Path | None = None, echo: Callable[[str], None] = print, *, needed: Sequence[str] = ()) -> Path:
    """The kit's folder (default `kit_dir()`), built first when it is not (about two minutes, once)."""
    kit = kit_dir() if kit is None else Path(kit)
    if not is_built(kit, needed):
        from shared.tiny.build import build_tiny  # torch and transformers: only when there is work to do

        echo(f"building the tiny kit in {kit} (about 2 minutes, once)...")
        build_tiny(kit, progress=echo)
    return kit
