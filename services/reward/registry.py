"""The models being served, by name, each with its own scorer and batcher.

Replacing a model loads the new one first (off the event loop) and swaps it in only when it works; the old one then
drains: requests that started on it finish on it, new ones go to the replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from services.reward.metrics import RewardMetrics
from services.reward.scorer import Scorer
from services.reward.settings import BatchingSettings
from shared.batching import Batcher
from shared.schemas import ModelInfo, ModelSpec

log = logging.getLogger(__name__)


class UnknownModelError(KeyError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.message = f"unknown model {name!r}; loaded models: {', '.join(known) or 'none'}"


class DefaultModelError(ValueError):
    pass


class ModelCapError(RuntimeError):
    pass


@dataclass
class ModelHandle:
    name: str
    scorer: Scorer
    batcher: Batcher[list[int], list[float]]


class ModelRegistry:
    def __init__(self, batching: BatchingSettings, device: str, metrics: RewardMetrics, max_models: int = 4):
        self._batching = batching
        self.max_models = max_models
        self._device = device
        self._metrics = metrics
        self._models: dict[str, ModelHandle] = {}
        self.default: str | None = None
        self._admin = asyncio.Lock()  # one load/replace/remove at a time
        self._draining: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str | None) -> ModelHandle:
        key = name or self.default
        if key is None or key not in self._models:
            raise UnknownModelError(key or "(default)", list(self._models))
        return self._models[key]

    def _make_handle(self, name: str, scorer: Scorer) -> ModelHandle:
        b = self._batching
        batcher = Batcher(
            scorer.forward, cost=len, max_batch_size=b.max_batch_size, max_batch_tokens=b.max_batch_tokens,
            max_wait_ms=b.max_wait_ms, max_queue_size=b.max_queue_size,
            on_batch=lambda stats: self._metrics.observe_batch(name, stats),
        )
        return ModelHandle(name, scorer, batcher)

    async def put(self, name: str, spec: ModelSpec, make_default: bool = False) -> tuple[ModelHandle, bool]:
        """Load `spec` as `name` (ModelLoadError leaves any old model serving). Returns (handle, replaced)."""
        async with self._admin:
            if name not in self._models and len(self._models) >= self.max_models:
                raise ModelCapError(f"{len(self._models)} models are loaded, the most allowed (max_models); "
                                    "remove one or replace an existing name")
            log.info("loading model %r from %s", name, spec.source)
            scorer = await asyncio.to_thread(Scorer, spec, self._device)
            handle = self._make_handle(name, scorer)
            old = self._models.get(name)
            self._models[name] = handle
            if make_default or self.default is None:
                self.default = name
            self._metrics.loaded.set(len(self._models))
            if old is not None:
                self._retire(old)
            log.info("model %r ready (label %s, score %s, input %s, max_length %d, backend %s %s)", name,
                     scorer.label, scorer.spec.score, scorer.input_kind, scorer.max_length, scorer.backend.kind,
                     scorer.backend.dtype)
            return handle, old is not None

    async def remove(self, name: str) -> None:
        async with self._admin:
            handle = self.get(name)
            if name == self.default and len(self._models) > 1:
                raise DefaultModelError(f"{name!r} is the default model; make another model the default first")
            del self._models[name]
            if self.default == name:
                self.default = None
            self._metrics.loaded.set(len(self._models))
            with contextlib.suppress(KeyError):  # no gauge yet if never scraped
                self._metrics.queue_depth.remove(name)
            self._retire(handle)

    def _retire(self, handle: ModelHandle) -> None:
        """Let requests already queued on `handle` finish, then free it, without blocking the caller."""
        task = asyncio.get_running_loop().create_task(handle.batcher.close())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def unhealthy(self) -> str | None:
        """Why some model cannot serve now (its batch worker died and is restarting), or None."""
        for name, handle in self._models.items():
            if handle.batcher.worker_error:
                return f"model {name!r}: {handle.batcher.worker_error}"
        return None

    def refresh_gauges(self) -> None:
        for name, handle in self._models.items():
            self._metrics.queue_depth.labels(name).set(handle.batcher.depth)

    def infos(self) -> list[ModelInfo]:
        return [
            ModelInfo(name=name, source=h.scorer.spec.source, labels=h.scorer.id2label, reward_label=h.scorer.label,
                      score_kind=h.scorer.spec.score, max_length=h.scorer.max_length, dtype=h.scorer.spec.dtype,
                      device=h.scorer.device, default=name == self.default, input=h.scorer.input_kind,
                      backend=h.scorer.backend.kind, backend_requested=h.scorer.backend_requested,
                      reward_mean=h.scorer.reward_mean, reward_std=h.scorer.reward_std)
            for name, h in self._models.items()
        ]

    async def close(self) -> None:
        for handle in list(self._models.values()):
            self._retire(handle)
        self._models.clear()
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
