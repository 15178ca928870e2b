"""Process-wide runtime knobs that must be set before any model runs."""

from __future__ import annotations

import os


def configure_torch(threads: int) -> None:
    """Pin torch's intra-op thread count.

    An unpinned torch takes every core; with another busy process on a 2-core machine small models then ran 100x
    slower. Every service, test and benchmark calls this once at start.
    """
    import torch

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    # Inter-op threads can only be set before the first parallel op; later calls raise, which is harmless here.
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows: no affinity API
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
