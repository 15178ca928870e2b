"""Dynamic batching: items in, futures out. Knows nothing of HTTP or torch.

One worker task per batcher forms batches from the waiting items and runs `process(batch)` in a worker thread, so
the event loop keeps accepting requests while a batch computes; the next batch forms meanwhile.

Batch formation: the oldest waiting item always goes first (no starvation); the rest of the batch is filled with the
waiting items that may share its batch (same `key`, e.g. the same sampling parameters) closest to it in cost, so a
batch holds items of similar length and pads little. A batch stops growing at `max_batch_size` items or when its
padded cost (`len(batch) * largest cost`) would pass `max_batch_tokens`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)
RESTART_BACKOFF_S = 0.5  # first pause before a dead worker restarts; doubles while it keeps dying
RESTART_BACKOFF_MAX_S = 30.0


class QueueFullError(Exception):
    """The queue cannot take the request's items now; the caller should retry later."""

    def __init__(self, depth: int, capacity: int):
        super().__init__(f"queue is full ({depth} of {capacity} items waiting); retry later")


class BatcherClosedError(Exception):
    """The batcher stopped taking items (its model is being removed or the service is shutting down)."""


class BatchTimeoutError(Exception):
    """The request was not served within its timeout."""


class WorkerDiedError(Exception):
    """The worker died while this request's batch was being formed or computed; it restarts by itself."""


async def gather_within(futures: Sequence[asyncio.Future], timeout: float | None) -> list:
    """Every future's result, in order, or BatchTimeoutError once `timeout` seconds have passed."""
    try:
        return await asyncio.wait_for(asyncio.gather(*futures), timeout)
    except TimeoutError:
        raise BatchTimeoutError(f"request not served within {timeout:.3g} s") from None


@dataclass
class BatchStats:
    """What one processed batch looked like; handed to the `on_batch` observer."""

    size: int
    tokens: int  # real (unpadded) cost
    padded_tokens: int  # len(batch) * longest
    seconds: float
    failed: bool


@dataclass(eq=False)
class _Pending(Generic[T]):
    item: T
    cost: int
    key: Hashable
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Timing:
    """Where a request's time went, in seconds: waiting for a batch and inside batches."""

    queue: float
    compute: float


class Batcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        *,
        cost: Callable[[T], int],
        key: Callable[[T], Hashable] | None = None,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 2.0,
        max_queue_size: int = 4096,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        if max_batch_size < 1 or max_batch_tokens < 1 or max_queue_size < 1 or max_wait_ms < 0:
            raise ValueError("batch size, token budget and queue size must be positive; max_wait_ms >= 0")
        self._process = process
        self._cost = cost
        self._key = key or (lambda item: None)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._waiting: list[_Pending[T]] = []
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        self._worker: asyncio.Task | None = None
        self._closed = False
        self._in_flight = 0  # items taken into a batch that has not finished yet
        self._recent_load: deque[int] = deque(maxlen=64)  # items waiting or computing, seen at each arrival
        self._batch: list[_Pending[T]] = []  # the batch being computed, failed if the worker dies under it
        self.worker_error: str | None = None  # why the worker last died, until it is back
        self.worker_restarts = 0

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._waiting)

    @property
    def busy(self) -> int:
        """Items waiting or being computed."""
        return len(self._waiting) + self._in_flight

    def start(self) -> None:
        if self._worker is None and not self._closed:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")
            self._worker.add_done_callback(self._on_worker_exit)

    def _on_worker_exit(self, task: asyncio.Task) -> None:
        """A worker that died (a bug, never a model error: those fail their batch) is restarted after a pause,
        with the items still waiting kept; the batch it held fails with WorkerDiedError so its callers can retry."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.worker_error = f"batch worker died: {type(exc).__name__}: {exc}"
        log.error("%s; restarting it", self.worker_error, exc_info=exc)
        for p in self._batch:
            if not p.future.done():
                p.future.set_exception(WorkerDiedError(self.worker_error))
        self._batch, self._in_flight, self._worker = [], 0, None
        self.worker_restarts += 1
        delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** min(self.worker_restarts - 1, 8))
        asyncio.get_running_loop().call_later(delay, self._restart)

    def _restart(self) -> None:
        self.worker_error = None
        self.start()

    async def submit(self, items: Sequence[T], timeout: float | None = None) -> tuple[list[R], Timing]:
        """Queue every item of one request and wait for all results, in order.

        The request is admitted whole or not at all (QueueFullError). On timeout or cancellation its items still
        waiting are dropped, so an abandoned request costs no compute.
        """
        if self._closed:
            raise BatcherClosedError("this model is no longer accepting requests")
        if not items:
            return [], Timing(0.0, 0.0)
        if len(self._waiting) + len(items) > self.max_queue_size:
            raise QueueFullError(len(self._waiting), self.max_queue_size)
        self.start()
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        pending = [_Pending(item, max(1, self._cost(item)), self._key(item), loop.create_future()) for item in items]
        self._waiting.extend(pending)
        self._recent_load.append(self.busy)
        self._arrived.set()
        try:
            results = await gather_within([p.future for p in pending], timeout)
        finally:
            self._drop(pending)
        timings = [r[1] for r in results]
        started = max(t[0] for t in timings)
        finished = max(t[1] for t in timings)
        return [r[0] for r in results], Timing(queue=started - submitted, compute=finished - started)

    def _drop(self, pending: list[_Pending[T]]) -> None:
        gone = {id(p) for p in pending if not p.future.done() or p.future.cancelled()}
        if gone:
            self._waiting = [p for p in self._waiting if id(p) not in gone]
        for p in pending:
            if not p.future.done():
                p.future.cancel()

    def _take_batch(self) -> list[_Pending[T]]:
        """The oldest item plus the compatible waiting items nearest to it in cost, within both limits."""
        anchor = self._waiting[0]
        compatible = [p for p in self._waiting[1:] if p.key == anchor.key]
        others = sorted(compatible, key=lambda p: (abs(p.cost - anchor.cost), p.enqueued))
        batch, longest = [anchor], anchor.cost
        for p in others:
            if len(batch) >= self.max_batch_size:
                break
            wider = max(longest, p.cost)
            if wider * (len(batch) + 1) > self.max_batch_tokens:
                continue
            batch.append(p)
            longest = wider
        taken = {id(p) for p in batch}
        self._waiting = [p for p in self._waiting if id(p) not in taken]
        return batch

    def _enough_waiting(self) -> bool:
        """Stop waiting once a full batch is here, or as many items as were recently in the system at once.

        Under a steady closed loop of N clients that is N: the batch waits for the clients of the batch that just
        finished to come back, so two half batches merge instead of alternating for ever. A lone client never
        waits at all."""
        target = min(self.max_batch_size, max(self._recent_load, default=self.max_batch_size))
        return len(self._waiting) >= target or sum(p.cost for p in self._waiting) >= self.max_batch_tokens

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            # Give concurrent requests a moment to join, unless enough are already waiting.
            deadline = loop.time() + self.max_wait
            while not self._enough_waiting() and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            self._waiting = [p for p in self._waiting if not p.future.done()]
            if not self._waiting:
                continue
            await self._compute(loop, self._take_batch())

    async def _compute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T]]) -> None:
        """Run one batch and settle its futures. A method of its own so that nothing of the batch (its items hold
        models) stays referenced while the worker waits for the next one."""
        self._batch, self._in_flight = batch, len(batch)
        started = time.perf_counter()
        results: Sequence[R] = ()
        error: Exception | None = None
        try:
            results = await loop.run_in_executor(self._executor, self._process, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} items produced {len(results)} results")
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear about the failure
            results, error = (), exc
        finished = time.perf_counter()
        self._in_flight, self._batch = 0, []
        for i, p in enumerate(batch):
            if p.future.done():
                continue
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result((results[i], (started, finished)))
        if self._on_batch is not None:
            costs = [p.cost for p in batch]
            self._on_batch(BatchStats(len(batch), sum(costs), len(batch) * max(costs), finished - started,
                                      error is not None))

    async def close(self) -> None:
        """Stop taking items, finish every item already queued, then stop the worker."""
        self._closed = True
        self._arrived.set()
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)
        for p in self._waiting:  # only left when the worker died during the close
            if not p.future.done():
                p.future.set_exception(BatcherClosedError("the service is shutting down"))
        self._waiting = []
        self._executor.shutdown(wait=True)
