"""Which checkpoints exist and which are in memory: discovery on demand, loads shared and off the loop, LRU.

Discovery is a directory scan on each request that names `latest`, an unknown checkpoint, or the listing, so a
checkpoint the trainer commits (renames into place) is servable at once, without a restart or a poll loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.checkpoints import CheckpointInfo, CheckpointNameError, checkpoint_path, read_checkpoint, scan_checkpoints
from shared.modeling import ModelLoadError, load_pretrained

log = logging.getLogger(__name__)
BASE = "base"
LATEST = "latest"


class CheckpointNotFoundError(LookupError):
    pass


class CheckpointInvalidError(RuntimeError):
    pass


class NotReadyError(RuntimeError):
    pass


@dataclass
class LoadedPolicy:
    name: str
    model: torch.nn.Module
    tokenizer: object
    step: int | None

    @property
    def max_positions(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))


def load_policy(name: str, source: str, device: str, step: int | None = None, revision: str | None = None):
    tokenizer = load_pretrained(AutoTokenizer, source, revision=revision)
    model = load_pretrained(AutoModelForCausalLM, source, revision=revision)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    return LoadedPolicy(name, model, tokenizer, step)


class CheckpointStore:
    def __init__(self, base_source: str, root: Path | None, device: str, max_loaded: int,
                 revision: str | None = None):
        self.base_source, self.root, self.device = base_source, root, device
        self.revision = revision
        self.max_loaded = max_loaded
        self.base: LoadedPolicy | None = None
        self._loaded: OrderedDict[str, LoadedPolicy] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # name -> (manifest time, why), so a bad one is not retried

    async def load_base(self) -> None:
        self.base = await asyncio.to_thread(load_policy, BASE, self.base_source, self.device, None, self.revision)

    @property
    def loaded_names(self) -> list[str]:
        return [BASE, *self._loaded] if self.base else list(self._loaded)

    def listing(self) -> list[CheckpointInfo]:
        found = scan_checkpoints(self.root) if self.root else []
        for info in found:
            failed = self._failed.get(info.name)
            if info.valid and failed and failed[0] == info.time:
                info.valid, info.error = False, failed[1]
        return found

    def resolve(self, name: str) -> CheckpointInfo | None:
        """The checkpoint `name` refers to (None for base). Raises for unknown, invalid or unsafe names."""
        if name == BASE:
            return None
        if name == LATEST:
            valid = [c for c in self.listing() if c.valid]
            if not valid:
                return None  # nothing trained yet: latest is the base model
            return valid[-1]
        if self.root is None:
            raise CheckpointNotFoundError(f"checkpoint {name!r} not found: this server has no checkpoint folder")
        try:
            path = checkpoint_path(self.root, name)
        except CheckpointNameError as exc:
            raise CheckpointNotFoundError(str(exc)) from None
        info = read_checkpoint(self.root, path.parent.name, path) if path.is_dir() else None
        if info is None:
            raise CheckpointNotFoundError(f"checkpoint {name!r} not found (or still being written)")
        failed = self._failed.get(info.name)
        if failed and failed[0] == info.time:
            info.valid, info.error = False, failed[1]
        if not info.valid:
            raise CheckpointInvalidError(f"checkpoint {name!r} is invalid: {info.error}")
        return info

    async def get(self, name: str) -> LoadedPolicy:
        """The loaded policy for `name` (base, latest or `<run>/step-<N>`), loading it once if needed."""
        info = self.resolve(name)
        if info is None:
            if self.base is None:
                raise NotReadyError("the base model is still loading")
            return self.base
        if info.name in self._loaded:
            self._loaded.move_to_end(info.name)
            return self._loaded[info.name]
        if info.name not in self._loading:  # concurrent requests for one checkpoint share a single load
            self._loading[info.name] = asyncio.ensure_future(self._load(info))
        return await asyncio.shield(self._loading[info.name])

    async def _load(self, info: CheckpointInfo) -> LoadedPolicy:
        try:
            policy = await asyncio.to_thread(load_policy, info.name, str(info.path), self.device, info.step)
        except ModelLoadError as exc:
            self._failed[info.name] = (info.time, str(exc))
            raise CheckpointInvalidError(f"checkpoint {info.name!r} is invalid: {exc}") from None
        finally:
            self._loading.pop(info.name, None)
        self._loaded[info.name] = policy
        while len(self._loaded) > self.max_loaded:
            evicted, _ = self._loaded.popitem(last=False)  # requests holding it finish; memory goes with them
            log.info("evicted checkpoint %s", evicted)
        log.info("loaded checkpoint %s", info.name)
        return policy
