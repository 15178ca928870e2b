"""Which checkpoints exist and which are in memory: discovery on demand, loads shared and off the loop, LRU.

Discovery is a directory scan, reused while the tree is unchanged (a commit renames a folder into place, which
changes its parent's mtime), so a checkpoint the trainer commits is servable at once, without a restart or a poll
loop, and a burst of `latest` requests costs one scan. Loaded models are keyed on name and manifest time: a
checkpoint rewritten under the same name is loaded afresh, never served from a stale copy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from shared.checkpoints import CheckpointInfo, CheckpointNameError, checkpoint_path, read_checkpoint, scan_checkpoints
from shared.errors import OverloadedError, UnavailableError
from shared.modeling import ModelLoadError, load_causal_lm

log = logging.getLogger(__name__)
BASE = "base"
LATEST = "latest"


class CheckpointNotFoundError(LookupError):
    pass


class CheckpointInvalidError(RuntimeError):
    pass


class NotReadyError(UnavailableError):
    """The base model is still loading."""


class LoadCapacityError(OverloadedError):
    """Loading another checkpoint now would pass the memory bound; retry once loads or requests finish."""


@dataclass(eq=False)  # compared and hashed by identity: the store tracks the ones alive in a WeakSet
class LoadedPolicy:
    name: str
    model: torch.nn.Module
    tokenizer: object
    step: int | None

    @property
    def max_positions(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))

    @property
    def vocab_size(self) -> int:
        """Token ids the model scores (its logits' width)."""
        return int(self.model.get_output_embeddings().weight.shape[0])


def load_policy(name: str, source: str, device: str, step: int | None = None,
                revision: str | None = None) -> LoadedPolicy:
    model, tokenizer = load_causal_lm(source, revision=revision)
    return LoadedPolicy(name, model.to(device), tokenizer, step)


class ScanCache:
    """The checkpoint scan, reused while the tree's stamp is unchanged and at most `ttl` seconds old (the TTL
    catches in-place edits, which change no folder's mtime). One scan at a time: a burst waits for it."""

    def __init__(self, root: Path, ttl: float = 2.0):
        self.root, self.ttl = root, ttl
        self._lock = threading.Lock()
        self._found: list[CheckpointInfo] = []
        self._key: tuple | None = None

    def get(self) -> list[CheckpointInfo]:
        with self._lock:
            key = (_stamp(self.root), int(time.monotonic() / self.ttl))
            if key != self._key:
                self._found, self._key = scan_checkpoints(self.root), key
            return [replace(c) for c in self._found]  # copies: callers mark failed loads on them


def _stamp(root: Path) -> tuple | None:
    """Changes when a run or checkpoint folder is added, removed or renamed in (a commit is a rename)."""
    try:
        with os.scandir(root) as entries:
            runs = sorted((e.name, e.stat(follow_symlinks=False).st_mtime_ns) for e in entries)
        return root.stat().st_mtime_ns, tuple(runs)
    except OSError:
        return None


class CheckpointStore:
    """Memory bound: base + `max_loaded` checkpoints + `max_loads` in flight. A checkpoint evicted while requests
    still use it stays in memory until they finish and counts against the bound meanwhile."""

    def __init__(self, base_source: str, root: Path | None, device: str, max_loaded: int,
                 revision: str | None = None, max_loads: int = 1):
        self.base_source, self.root, self.device = base_source, root, device
        self.revision = revision
        self.max_loaded, self.max_loads = max_loaded, max_loads
        self.base: LoadedPolicy | None = None
        self._scans = ScanCache(root) if root else None
        self._loaded: OrderedDict[tuple[str, float], LoadedPolicy] = OrderedDict()  # (name, manifest time) -> model
        self._loading: dict[tuple[str, float], asyncio.Future] = {}
        self._resident: weakref.WeakSet[LoadedPolicy] = weakref.WeakSet()  # checkpoints in memory, evicted or not
        self._failed: dict[str, tuple[float, str]] = {}  # name -> (manifest time, why), so a bad one is not retried

    async def load_base(self) -> None:
        self.base = await asyncio.to_thread(load_policy, BASE, self.base_source, self.device, None, self.revision)

    @property
    def loaded_names(self) -> list[str]:
        return [BASE, *(name for name, _ in self._loaded)] if self.base else [name for name, _ in self._loaded]

    @property
    def resident(self) -> int:
        """Models in memory, base included: loaded, evicted but still in use, or loading."""
        return (self.base is not None) + len(self._resident) + len(self._loading)

    def is_loaded(self, info: CheckpointInfo) -> bool:
        return (info.name, info.time) in self._loaded

    def listing(self) -> list[CheckpointInfo]:
        found = self._scans.get() if self._scans else []
        for info in found:
            self._mark_failed(info)
        return found

    def _mark_failed(self, info: CheckpointInfo) -> None:
        failed = self._failed.get(info.name)
        if info.valid and failed and failed[0] == info.time:
            info.valid, info.error = False, failed[1]

    def resolve(self, name: str) -> CheckpointInfo | None:
        """The checkpoint `name` refers to (None for base). Raises for unknown, invalid or unsafe names. Blocking
        (it reads the disk): call it off the event loop."""
        if name == BASE:
            return None
        if name == LATEST:
            valid = [c for c in self.listing() if c.valid]
            return valid[-1] if valid else None  # nothing trained yet: latest is the base model
        if self.root is None:
            raise CheckpointNotFoundError(f"checkpoint {name!r} not found: this server has no checkpoint folder")
        try:
            path = checkpoint_path(self.root, name)
        except CheckpointNameError as exc:
            raise CheckpointNotFoundError(str(exc)) from None
        info = read_checkpoint(self.root, path.parent.name, path)
        if info is None:
            raise CheckpointNotFoundError(f"checkpoint {name!r} not found (or still being written)")
        self._mark_failed(info)
        if not info.valid:
            raise CheckpointInvalidError(f"checkpoint {name!r} is invalid: {info.error}")
        return info

    async def get(self, name: str) -> LoadedPolicy:
        """The loaded policy for `name` (base, latest or `<run>/step-<N>`), loading it once if needed."""
        if self.base is None:
            raise NotReadyError("the base model is still loading")
        info = await asyncio.to_thread(self.resolve, name)
        if info is None:
            return self.base
        key = (info.name, info.time)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        if key not in self._loading:  # concurrent requests for one checkpoint share a single load
            self._admit_load(info.name)
            self._loading[key] = asyncio.ensure_future(self._load(info, key))
        return await asyncio.shield(self._loading[key])

    def _admit_load(self, name: str) -> None:
        if len(self._loading) >= self.max_loads:
            raise LoadCapacityError(f"cannot load {name!r} now: {len(self._loading)} checkpoint loads are in "
                                    "progress; retry shortly")
        if len(self._resident) + len(self._loading) >= self.max_loaded + self.max_loads:
            raise LoadCapacityError(f"cannot load {name!r} now: {len(self._resident)} checkpoints are in memory "
                                    "(evicted ones still serve requests); retry shortly")

    async def _load(self, info: CheckpointInfo, key: tuple[str, float]) -> LoadedPolicy:
        try:
            policy = await asyncio.to_thread(load_policy, info.name, str(info.path), self.device, info.step)
        except ModelLoadError as exc:
            self._failed[info.name] = (info.time, str(exc))
            raise CheckpointInvalidError(f"checkpoint {info.name!r} is invalid: {exc}") from None
        finally:
            self._loading.pop(key, None)
        self._resident.add(policy)
        for stale in [k for k in self._loaded if k[0] == info.name]:  # rewritten under the same name
            del self._loaded[stale]
        self._loaded[key] = policy
        while len(self._loaded) > self.max_loaded:
            (evicted, _), _ = self._loaded.popitem(last=False)  # requests holding it finish; memory goes with them
            log.info("evicted checkpoint %s", evicted)
        log.info("loaded checkpoint %s", info.name)
        return policy
