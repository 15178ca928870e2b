"""One log format for every command and service."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int = "info") -> None:
    """Log to stderr at `level` (a name such as "info", or a number); httpx only from WARNING, since its line per
    request would drown everything else."""
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)
