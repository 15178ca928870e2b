"""Loading Hugging Face models and tokenizers from a local folder or a hub id, with errors a person can act on."""

from __future__ import annotations

import os
from pathlib import Path


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why and what was tried."""


def looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def load_pretrained(loader, source: str, *, revision: str | None = None, **kwargs):
    """`loader.from_pretrained(source)` with a clear ModelLoadError instead of a library traceback."""
    path = Path(source).expanduser()
    if looks_local(source) and not path.is_dir():
        raise ModelLoadError(f"model folder {source!r} does not exist")
    try:
        return loader.from_pretrained(str(path) if looks_local(source) else source, revision=revision, **kwargs)
    except Exception as exc:  # noqa: BLE001 - corrupt weights, wrong architecture, hub errors: all one story
        offline = " (HF_HUB_OFFLINE is set, so only cached hub models load)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelLoadError(f"cannot load {source!r}{offline}: {exc}") from exc
