"""Which model sources PUT /v1/models may load: the startup models, folders under `model_dirs`, and hub ids only
when enabled.

Refusals never touch the filesystem's answer: a path outside the roots gets the same error whether or not it
exists, so the admin API reveals nothing about the server's files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from shared.modeling import looks_local

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


class SourceRefusedError(PermissionError):
    pass


class SourcePolicy:
    def __init__(self, model_dirs: Iterable[Path], startup_sources: Iterable[str], allow_hub: bool):
        startup = list(startup_sources)
        self.roots = [Path(p).expanduser().resolve() for p in model_dirs]
        # The operator chose the startup models, so reloading them is always allowed.
        self.startup = set(startup) | {str(Path(s).expanduser().resolve()) for s in startup if looks_local(s)}
        self.allow_hub = allow_hub

    def check(self, source: str) -> str:
        """The source to load (a resolved folder, or a hub id), or SourceRefusedError."""
        explicit_path = source.startswith(("/", ".", "~")) or "\\" in source or ".." in source
        try:
            path = Path(source).expanduser().resolve()  # symlinks followed: a link out of a root is refused
        except (ValueError, OSError, RuntimeError):  # NUL bytes, unknown ~user, ...: not a usable path
            path = None
        if source in self.startup or str(path) in self.startup:
            return source
        if path is not None and any(root in path.parents for root in self.roots):
            return str(path)
        if not explicit_path and self.allow_hub and HUB_ID.fullmatch(source):
            return source
        hub = " or hub ids (allow_hub_models is on)" if self.allow_hub else ""
        raise SourceRefusedError(f"model source {source!r} is not allowed: PUT /v1/models loads only folders under "
                                 f"the configured model_dirs{hub}")
