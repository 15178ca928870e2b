"""The batching queue on its own: items in, futures out; no HTTP, no torch."""

import asyncio
import threading

import pytest

from shared.batching import Batcher, BatcherClosedError, BatchStats, BatchTimeoutError, QueueFullError


class Recorder:
    """A process function that records every batch; items are strings, results their upper-case form."""

    def __init__(self, fail_on: str | None = None, delay: float = 0.0):
        self.batches: list[list[str]] = []
        self.fail_on, self.delay = fail_on, delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: list[str]) -> list[str]:
        self.gate.wait(5)
        self.batches.append(list(batch))
        if self.delay:
            threading.Event().wait(self.delay)
        if self.fail_on is not None and self.fail_on in batch:
            raise RuntimeError("poisoned batch")
        return [item.upper() for item in batch]


def make(process, **kw) -> Batcher:
    kw.setdefault("max_wait_ms", 5)
    return Batcher(process, cost=len, **kw)


async def test_each_request_gets_its_own_results_in_order():
    rec = Recorder()
    b = make(rec, max_batch_size=8)
    requests = [[f"r{i}-{j}" for j in range(i % 4 + 1)] for i in range(20)]
    results = await asyncio.gather(*(b.submit(r) for r in requests))
    for request, (values, timing) in zip(requests, results):
        assert values == [x.upper() for x in request]
        assert timing.queue >= 0 and timing.compute >= 0
    assert sum(len(x) for x in rec.batches) == sum(len(r) for r in requests)
    assert max(len(x) for x in rec.batches) <= 8
    assert len(rec.batches) < 20  # concurrent requests were merged
    await b.close()


async def test_batch_respects_padded_token_budget_and_groups_by_length():
    rec = Recorder()
    rec.gate.clear()  # hold the first batch so the rest queue up together
    b = make(rec, max_batch_size=64, max_batch_tokens=40)
    first = asyncio.create_task(b.submit(["z"]))
    await asyncio.sleep(0.05)
    items = ["a" * 2, "b" * 10, "c" * 2, "d" * 10, "e" * 2, "f" * 10, "g" * 3]
    tasks = [asyncio.create_task(b.submit([x])) for x in items]
    await asyncio.sleep(0.05)
    rec.gate.set()
    await asyncio.gather(first, *tasks)
    for batch in rec.batches:
        assert len(batch) * max(map(len, batch)) <= 40
    # The short texts travel together, the long ones together.
    short = next(batch for batch in rec.batches if "aa" in batch)
    assert {"aa", "cc", "ee", "ggg"} <= set(short)
    assert not any(len(x) == 10 for x in short)
    await b.close()


async def test_a_single_item_over_the_budget_still_runs_alone():
    rec = Recorder()
    b = make(rec, max_batch_tokens=4)
    values, _ = await b.submit(["x" * 50])
    assert values == ["X" * 50]
    await b.close()


async def test_failing_batch_fails_only_its_own_requests():
    rec = Recorder(fail_on="poison")
    b = make(rec, max_batch_size=2, max_wait_ms=20)
    good = asyncio.create_task(b.submit(["ok1", "ok2"]))
    await asyncio.sleep(0.01)
    bad = asyncio.create_task(b.submit(["poison"]))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert results[0][0] == ["OK1", "OK2"]
    assert isinstance(results[1], RuntimeError)
    values, _ = await b.submit(["after"])  # the batcher keeps serving
    assert values == ["AFTER"]
    await b.close()


async def test_every_request_in_a_failed_batch_hears_the_error():
    rec = Recorder(fail_on="poison")
    rec.gate.clear()
    b = make(rec, max_batch_size=16)
    blocker = asyncio.create_task(b.submit(["first"]))
    await asyncio.sleep(0.05)
    tasks = [asyncio.create_task(b.submit([x])) for x in ("a", "poison", "b")]
    await asyncio.sleep(0.05)
    rec.gate.set()
    results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
    assert results[0][0] == ["FIRST"]
    assert all(isinstance(r, RuntimeError) for r in results[1:])
    await b.close()


async def test_wrong_number_of_results_is_an_error_not_a_misalignment():
    b = make(lambda batch: batch[:-1])
    with pytest.raises(RuntimeError, match="produced"):
        await b.submit(["a", "b"])
    await b.close()


async def test_full_queue_rejects_the_whole_request_and_keeps_the_rest():
    rec = Recorder()
    rec.gate.clear()
    b = make(rec, max_batch_size=1, max_queue_size=3)
    first = asyncio.create_task(b.submit(["a"]))
    await asyncio.sleep(0.05)  # "a" is in the worker, the queue is empty
    queued = asyncio.create_task(b.submit(["b", "c"]))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFullError):
        await b.submit(["d", "e"])
    rec.gate.set()
    assert (await first)[0] == ["A"]
    assert (await queued)[0] == ["B", "C"]
    assert ["d"] not in rec.batches and ["e"] not in rec.batches
    await b.close()


async def test_timeout_drops_the_requests_waiting_items():
    rec = Recorder()
    rec.gate.clear()
    b = make(rec, max_batch_size=1)
    blocker = asyncio.create_task(b.submit(["slow"]))
    await asyncio.sleep(0.05)
    with pytest.raises(BatchTimeoutError):
        await b.submit(["late1", "late2"], timeout=0.05)
    assert b.depth == 0
    rec.gate.set()
    await blocker
    await b.submit(["next"])
    assert all("late1" not in batch for batch in rec.batches)
    await b.close()


async def test_close_finishes_queued_work_then_refuses_new_items():
    rec = Recorder(delay=0.01)
    b = make(rec, max_batch_size=2)
    tasks = [asyncio.create_task(b.submit([f"x{i}"])) for i in range(6)]
    await asyncio.sleep(0)
    await b.close()
    assert [r[0] for r in await asyncio.gather(*tasks)] == [[f"X{i}"] for i in range(6)]
    with pytest.raises(BatcherClosedError):
        await b.submit(["late"])


async def test_batch_stats_report_padding():
    seen: list[BatchStats] = []
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, cost=len, max_batch_size=8, max_wait_ms=5, on_batch=seen.append)
    first = asyncio.create_task(b.submit(["q"]))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(b.submit(["aaaa", "bb"]))
    await asyncio.sleep(0.02)
    rec.gate.set()
    await asyncio.gather(first, second)
    stats = seen[-1]
    assert (stats.size, stats.tokens, stats.padded_tokens, stats.failed) == (2, 6, 8, False)
    await b.close()


def test_rejects_nonsense_limits():
    with pytest.raises(ValueError):
        Batcher(lambda b: b, cost=len, max_batch_size=0)


async def test_items_with_different_keys_never_share_a_batch():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, cost=len, key=lambda item: item[0], max_batch_size=16, max_wait_ms=5)
    first = asyncio.create_task(b.submit(["z0"]))
    await asyncio.sleep(0.05)
    tasks = [asyncio.create_task(b.submit([x])) for x in ("a1", "b1", "a2", "b2", "a3")]
    await asyncio.sleep(0.05)
    rec.gate.set()
    results = await asyncio.gather(first, *tasks)
    assert [r[0][0] for r in results] == ["Z0", "A1", "B1", "A2", "B2", "A3"]
    for batch in rec.batches:
        assert len({item[0] for item in batch}) == 1
    assert sorted(map(sorted, rec.batches)) == [["a1", "a2", "a3"], ["b1", "b2"], ["z0"]]
    await b.close()


async def test_a_lone_client_does_not_wait_out_max_wait():
    b = make(Recorder(), max_batch_size=32, max_wait_ms=1000)
    await b.submit(["first"])  # the first batch may wait: nothing is known about the load yet
    _, timing = await b.submit(["second"])
    assert timing.queue < 0.5  # far below the 1 s window: recent batches held one item
    await b.close()


async def test_a_split_closed_loop_heals_into_whole_batches():
    """One client first, seven while its batch runs: batches of 1 and 7 would alternate for ever unless the next
    batch waits for the client that just got its answer."""
    rec = Recorder(delay=0.01)
    b = make(rec, max_batch_size=32, max_wait_ms=200)

    async def client(i: int) -> None:
        for r in range(6):
            await b.submit([f"c{i}-{r}"])
            await asyncio.sleep(0.001 * (i % 3))  # clients come back at slightly different times

    rec.gate.clear()
    tasks = [asyncio.create_task(client(0))]
    await asyncio.sleep(0.05)  # client 0's first item is in the worker, held at the gate
    tasks += [asyncio.create_task(client(i)) for i in range(1, 8)]
    await asyncio.sleep(0.05)
    rec.gate.set()
    await asyncio.gather(*tasks)
    sizes = [len(x) for x in rec.batches]
    assert sizes[0] == 1 and sum(sizes) == 48
    assert sizes[1:5] == [8, 8, 8, 8]  # the seven waited for client 0 instead of leaving it behind
    await b.close()
