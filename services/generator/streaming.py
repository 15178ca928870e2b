"""Token streaming: a sequence's tokens as the model makes them, and the text they add up to, as async iterators
that the HTTP layer only frames (routes.py: OpenAI's server-sent events).

Both batching modes stream through a `RunStream`: continuous batching decodes the sequence in the running batch
(Scheduler.stream); static batching runs one generate call with a streamer (engine.generate_streaming) on the
streams' own thread. Either hands each token over from its thread as it is made and stops within a token once told.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from services.generator.engine import (
    GenerationItem,
    OnToken,
    TokenLogprob,
    finish_stream,
    generate_streaming,
    score_prompt,
    within,
)
from shared.errors import OverloadedError, UnavailableError

RunStream = Callable[[GenerationItem, OnToken, Callable[[], bool]], Awaitable[None]]


class Streams:
    """Admission for streamed sequences, which bypass the batching queue's bound: at most `limit` in flight (429
    beyond), none once closed (503). Continuous batching decodes them in the running batch; static batching runs
    their generate calls one at a time on the executor's thread (they take turns with batches on the model anyway),
    so waiting streams hold no thread the event loop needs. Streamed echo scores prompts on that thread too."""

    def __init__(self, limit: int):
        self.limit, self.used, self.closed = limit, 0, False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream")

    @contextmanager
    def hold(self, count: int) -> Iterator[None]:
        if self.closed:
            raise UnavailableError("the service is shutting down; retry")
        if self.used + count > self.limit:
            raise OverloadedError(f"{self.used} of {self.limit} streamed sequences in flight; retry later")
        self.used += count
        try:
            yield
        finally:
            self.used -= count

    async def generate(self, item: GenerationItem, on_token: OnToken, should_stop: Callable[[], bool]) -> None:
        """Static batching's RunStream: one generate call at a time, on the stream thread."""
        await asyncio.get_running_loop().run_in_executor(self.executor, generate_streaming, item, on_token,
                                                         should_stop)

    async def score_prompt(self, item: GenerationItem) -> list[TokenLogprob]:
        """The prompt's logprobs (echo), on the stream thread: it uses the model."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, score_prompt, item.policy, item.prompt_ids, item.params.logprobs or 0)

    def close(self) -> None:
        self.closed = True
        self.executor.shutdown(wait=False)


def nth_choice(item: GenerationItem, j: int) -> GenerationItem:
    """Choice `j` of a streamed prompt: one sequence, seeded `seed + j` so that choices differ yet repeat."""
    seed = None if item.params.seed is None else item.params.seed + j
    params = dataclasses.replace(item.params, seed=seed, num_return_sequences=1)
    return GenerationItem(item.policy, item.prompt, item.prompt_ids, params, item.request_id)


@dataclass(frozen=True)
class TokenEvent:
    token: int
    logprob: TokenLogprob | None  # when logprobs were asked for


@dataclass(frozen=True)
class TextDelta:
    """New text of a sequence, with the logprobs of the tokens that became wholly sent with it. The last delta of a
    sequence has its `finish_reason` and `tokens` (the completion's token count)."""

    text: str
    logprobs: list[TokenLogprob | None]
    finish_reason: str | None = None
    tokens: int = 0


class TokenStream:
    """One sequence's tokens as the model makes them, iterated once. `stop()` ends the generation within a token;
    the iteration then yields the tokens already made and ends. A generation that fails raises from the iteration
    after its tokens. `on_made` runs in the generating thread for every token made, read or not."""

    def __init__(self, item: GenerationItem, run: RunStream, on_made: Callable[[], None] | None = None):
        self.item, self.run, self.on_made = item, run, on_made
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()

        def on_token(token: int, info: TokenLogprob | None) -> None:  # in the generating thread
            if self.on_made is not None:
                self.on_made()
            loop.call_soon_threadsafe(queue.put_nowait, TokenEvent(token, info))

        async def produce() -> None:
            try:
                await self.run(self.item, on_token, self._halt.is_set)
            finally:  # after every token: they were queued (call_soon_threadsafe) before the run could end
                queue.put_nowait(None)

        job = asyncio.ensure_future(produce())
        try:
            while (event := await queue.get()) is not None:
                yield event
            await job
        finally:  # also when the consumer is closed (client gone): never generate for nobody
            self.stop()


async def text_deltas(item: GenerationItem, run: RunStream, is_gone: Callable[[], Awaitable[bool]],
                      on_made: Callable[[], None] | None = None) -> AsyncIterator[TextDelta]:
    """One sequence as text deltas. Text that may yet turn out to start a stop string (or be half a character) is
    held back until it cannot. Generation stops within a token once a stop string is complete or `is_gone()` (the
    client left); the last delta carries what was held back, the finish reason and the token count."""
    policy, params = item.policy, item.params
    tokens = TokenStream(item, run, on_made)
    ids: list[int] = []
    infos: list[TokenLogprob | None] = []
    sent, released = "", 0  # the text sent so far; the tokens whose logprobs went with it
    try:
        async for event in tokens:
            ids.append(event.token)
            infos.append(event.logprob)
            done = finish_stream(policy, ids, params)
            if done.finish_reason == "stop" or await is_gone():
                tokens.stop()
                continue
            safe = done.completion[: len(done.completion) - _unsettled(done.completion, params.stop)]
            if len(safe) > len(sent) and safe.startswith(sent):
                upto = within(policy, ids, len(safe)) if params.logprobs is not None else released
                yield TextDelta(safe[len(sent):], infos[released:upto])
                sent, released = safe, upto
    finally:  # also when this iterator is closed before the end
        tokens.stop()
    final = finish_stream(policy, ids, params)
    tail = final.completion[len(sent):] if final.completion.startswith(sent) else ""
    yield TextDelta(tail, infos[released: final.kept], final.finish_reason, final.tokens)


def _unsettled(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` may still change: the longest end that starts a stop string, or
    replacement characters (a token that ends inside a UTF-8 character)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold
