"""Continuous batching: requests join and leave the running batch between decode steps (iteration-level scheduling,
as in vLLM and TGI).

One scheduler thread owns the running batch (KVBatch: one KV cache, one loaded policy). Each step it
1. drops rows whose caller is gone (timeout, cancellation, a closed stream);
2. decodes one token for every running row (one forward), and prefills the rows it admits (one more forward,
   together, left-padded) and merges them into the batch;
3. processes each row's logits: non-finite rows fail alone; logprobs are recorded from the raw logits; penalties,
   logit_bias and min_tokens (engine.adjust_scores) run for the rows that ask for them; RowSampler picks the tokens
   with per-row temperature / top-k / top-p / min-p and per-request generators;
4. hands tokens to streams and retires finished rows (EOS, a stop string, max_new_tokens), whose completions go
   through engine._finish exactly as a `generate` call's would.

Admission. The oldest waiting row always decides: when the running batch is empty its key (checkpoint, and the
request itself when seeded) becomes the batch's; while rows of another key are waiting at the head, nothing more is
admitted, so the batch drains (within max_new_tokens steps) and switches: no checkpoint starves. Joining a running
batch costs a prefill forward that stalls every running row, so rows join in groups: once the joiners number a
quarter of the running rows or the oldest has waited `join_wait_steps` steps (TGI's `waiting_served_ratio` and
`max_waiting_tokens`). An idle batch admits at once.

Seeds. A seeded request gets its own torch.Generator (seeded with its seed) for its draws, and its rows run in a batch
of their own (its key holds the request): batch shape changes float rounding in the forward pass, and a seeded
request must give the same text however busy the server is. Its rows are admitted in arrival order at step
boundaries, so the same request replays the same steps. The text equals neither a static `generate` call under
torch.manual_seed(seed) nor an earlier server version's: only same seed -> same text is promised. Greedy rows share
batches with anything: greedy output equals in-process `generate` token for token.

Failures. A model error in a step (forward or sampling) fails the rows of that step; a non-finite or failing row
fails alone. A bug in the scheduler itself fails the running rows with WorkerDiedError and the thread resumes after
a back-off, keeping the waiting rows (`worker_error` says why meanwhile, for /readyz).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from services.generator.checkpoints import LoadedPolicy
from services.generator.engine import (
    Completion,
    GenerationItem,
    NonFiniteOutputError,
    OnToken,
    TokenLogprob,
    _finish,
    _padded,
    adjust_scores,
    bias_vector,
    prompt_presence,
    score_prompt,
)
from services.generator.kv_batch import KVBatch
from services.generator.sampling import RowSampler
from shared.batching import (
    RESTART_BACKOFF_MAX_S,
    RESTART_BACKOFF_S,
    BatcherClosedError,
    BatchStats,
    QueueFullError,
    Timing,
    WorkerDiedError,
    gather_within,
)

log = logging.getLogger(__name__)


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


@dataclass(eq=False)
class _Job:
    """One prompt of a request: its rows (num_return_sequences draws; one when greedy) and where the result goes."""

    item: GenerationItem
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    generator: torch.Generator | None
    on_token: OnToken | None = None  # streams: each token as it is made
    should_stop: Callable[[], bool] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    results: list[Completion | None] = field(default_factory=list)  # per draw
    pending: int = 0  # draws not finished yet
    scored: list[TokenLogprob] | None = None  # prompt logprobs (echo)
    over: bool = False  # answered, failed or abandoned: its rows stop

    @property
    def gone(self) -> bool:
        return self.over or self.future.done() or (self.should_stop is not None and self.should_stop())

    def fail(self, error: BaseException) -> None:
        if not self.over:
            self.over = True
            self.loop.call_soon_threadsafe(_settle, self.future, None, error)

    def finish_row(self, draw: int, completion: Completion | None) -> None:
        self.results[draw] = completion
        self.pending -= 1
        if self.over or self.pending:
            return
        self.over = True
        n = self.item.params.num_return_sequences
        if self.on_token is not None:
            answer = None
        else:  # greedy: one draw, copied
            answer = [dataclasses.replace(self.results[j % len(self.results)]) for j in range(n)]
        done = time.perf_counter()
        self.loop.call_soon_threadsafe(_settle, self.future, (answer, (self.admitted or done, done)))


@dataclass(eq=False)
class _Row:
    job: _Job
    draw: int
    key: Hashable
    arrival_step: int
    new: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    in_prompt: torch.Tensor | None = None  # (1, V), for the repetition penalty
    bias: torch.Tensor | None = None  # (V,), logit_bias
    error: BaseException | None = None  # failed this step


class Scheduler:
    def __init__(self, *, max_batch_size: int, max_batch_tokens: int, max_queue_size: int, join_wait_steps: int,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_first_token: Callable[[float], None] | None = None):
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_queue_size, self.join_wait_steps = max_queue_size, join_wait_steps
        self._on_batch, self._on_first_token = on_batch, on_first_token
        self._cond = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.worker_error: str | None = None
        self.worker_restarts = 0
        self.steps = 0
        self._reset()

    def _reset(self) -> None:
        self.policy: LoadedPolicy | None = None
        self.key: Hashable = None
        self.batch: KVBatch | None = None
        self.rows: list[_Row] = []
        self.joining: list[_Row] = []  # admitted this step, not in `rows` yet
        self.last: torch.Tensor | None = None  # (B,) each row's newest token, fed at the next step
        self.sampler: RowSampler | None = None

    # -- the event loop's side --------------------------------------------------------------------------------------

    def _jobs(self, items: Sequence[GenerationItem], **stream) -> list[_Job]:
        loop = asyncio.get_running_loop()
        seed = items[0].params.seed if items else None
        generator = None
        if seed is not None:  # one per request, shared by its prompts and draws, touched by nobody else
            generator = torch.Generator(device=items[0].policy.model.device).manual_seed(seed)
        return [_Job(item, loop, loop.create_future(), generator, **stream) for item in items]

    def _enqueue(self, jobs: list[_Job], bounded: bool) -> None:
        rows = []
        for job in jobs:
            p = job.item.params
            draws = p.num_return_sequences if p.do_sample else 1
            job.results, job.pending = [None] * draws, draws
            owner = job.item.request_id if p.seed is not None else None
            rows += [_Row(job, j, (id(job.item.policy), owner), self.steps) for j in range(draws)]
        with self._cond:
            if self._closed:
                raise BatcherClosedError("this model is no longer accepting requests")
            if bounded and len(self._waiting) + len(rows) > self.max_queue_size:
                raise QueueFullError(len(self._waiting), self.max_queue_size)
            self._waiting.extend(rows)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
                self._thread.start()

    def _abandon(self, jobs: list[_Job]) -> None:
        gone = {id(j) for j in jobs if not j.over}
        if not gone:
            return
        for job in jobs:
            job.over = True
            job.future.cancel()
        with self._cond:  # waiting rows leave now; running ones at the next step
            self._waiting = deque(r for r in self._waiting if id(r.job) not in gone)

    async def submit(self, items: Sequence[GenerationItem], timeout: float | None = None) -> tuple[list, Timing]:
        """Every prompt of one request; per prompt its completions. Admitted whole or not at all (QueueFullError)."""
        if not items:
            return [], Timing(0.0, 0.0)
        jobs = self._jobs(items)
        self._enqueue(jobs, bounded=True)
        try:
            answers = await gather_within([j.future for j in jobs], timeout)
        finally:
            self._abandon(jobs)
        started = min(a[1][0] for a in answers)
        finished = max(a[1][1] for a in answers)
        return [a[0] for a in answers], Timing(started - jobs[0].submitted, finished - started)

    async def stream(self, item: GenerationItem, on_token: OnToken, should_stop: Callable[[], bool]) -> None:
        """One sequence (num_return_sequences 1), each token handed to `on_token` from the scheduler thread as it is
        made; returns when it ends or once `should_stop()`. Streams have their own admission bound
        (streaming.Streams)."""
        jobs = self._jobs([item], on_token=on_token, should_stop=should_stop)
        self._enqueue(jobs, bounded=False)
        try:
            await jobs[0].future
        finally:
            self._abandon(jobs)

    async def close(self) -> None:
        """Stop taking requests, finish every row already queued or running, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        with self._cond:  # only left when the thread died during the close
            for row in self._waiting:
                row.job.fail(BatcherClosedError("the service is shutting down"))
            self._waiting.clear()

    # -- the scheduler thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            try:
                while self._next():
                    pass
                return
            except Exception as exc:  # noqa: BLE001 - a bug in the scheduler itself: fail its rows, resume
                self.worker_error = f"batch worker died: {type(exc).__name__}: {exc}"
                log.error("%s; restarting it", self.worker_error, exc_info=exc)
                for row in self.rows + self.joining:
                    row.job.fail(WorkerDiedError(self.worker_error))
                self._reset()
                self.worker_restarts += 1
                delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** min(self.worker_restarts - 1, 8))
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, delay)
                self.worker_error = None

    def _next(self) -> bool:
        """One step; False once closed with nothing left."""
        if not self.rows:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting and self._closed:
                    return False
        with torch.inference_mode():
            self._step()
        return True

    def _admit(self) -> list[_Row]:
        """Waiting rows to join now (see the module docstring); the first row's key becomes the batch's if idle."""
        with self._cond:
            while self._waiting and self._waiting[0].job.gone:
                self._waiting.popleft()
            if not self._waiting:
                return []
            running = len(self.rows)
            key = self._waiting[0].key if not running else self.key
            free = self.max_batch_size - running
            head = []
            for row in self._waiting:  # rows of the key ahead of the first row of another
                if len(head) >= free or row.key != key:
                    break
                if not row.job.gone:
                    head.append(row)
            if not head:
                return []
            # A prefill stalls every running row: join once the joiners are a quarter of them, or have waited enough.
            if 4 * len(head) < running and self.steps - head[0].arrival_step < self.join_wait_steps:
                return []
            costs = [len(r.job.item.prompt_ids) + r.job.item.params.max_new_tokens for r in self.rows]
            taken: list[_Row] = []
            for row in head:  # within max_batch_tokens (padded: rows x longest), but never nothing when idle
                costs.append(len(row.job.item.prompt_ids) + row.job.item.params.max_new_tokens)
                if (running or taken) and len(costs) * max(costs) > self.max_batch_tokens:
                    break
                taken.append(row)
            chosen = {id(r) for r in taken}
            self._waiting = deque(r for r in self._waiting if id(r) not in chosen)
        if not running:
            self.key, self.policy = key, taken[0].job.item.policy
            self.batch = KVBatch(self.policy.model)
        return taken

    def _step(self) -> None:
        started = time.perf_counter()
        self._retire([i for i, r in enumerate(self.rows) if r.job.gone], done=False)
        self.joining = self._start(self._admit())
        if not self.rows and not self.joining:
            return
        try:
            tokens = self._forward_and_choose()
        except Exception as exc:  # noqa: BLE001 - the model failed: the rows of this step fail with it
            log.exception("a decode step of %s failed", self.policy.name)
            for row in self.rows + self.joining:
                row.job.fail(exc)
            self._reset()
            return
        self.steps += 1
        finished = self._advance(tokens.tolist())
        if self._on_batch is not None:
            size = len(self.rows)
            self._on_batch(BatchStats(size, size, size * self.batch.mask.shape[1], time.perf_counter() - started,
                                      False))
        self._retire(finished, done=True)

    def _forward_and_choose(self) -> torch.Tensor:
        """Decode the running rows, prefill and merge the joining ones; every row's next token (B,)."""
        logits = [self.batch.decode(self.last)] if self.rows else []
        if self.joining:
            ids, mask = _padded(self.policy, [r.job.item.prompt_ids for r in self.joining])
            logits.append(self.batch.join(ids, mask))
            self.rows, self.joining, self.sampler = self.rows + self.joining, [], None
        if self.sampler is None:
            self.sampler = RowSampler([r.job.item.params for r in self.rows], [r.job.generator for r in self.rows],
                                      logits[0].device)
        self.last = self._choose(torch.cat(logits) if len(logits) > 1 else logits[0])
        return self.last

    def _start(self, joining: list[_Row]) -> list[_Row]:
        """First rows of their jobs: score the prompt (echo); jobs with nothing to generate end here."""
        rows = []
        for row in joining:
            job, p = row.job, row.job.item.params
            if job.admitted is None:
                job.admitted = time.perf_counter()
                try:
                    if p.prompt_logprobs:
                        job.scored = score_prompt(job.item.policy, job.item.prompt_ids, p.logprobs or 0)
                except Exception as exc:  # noqa: BLE001 - this prompt's failure is its own
                    job.fail(exc)
            if job.gone:
                continue
            if p.max_new_tokens == 0:  # echo only: the prompt scored, nothing generated
                job.finish_row(row.draw, Completion("", "length", 0, 0, [] if p.logprobs is not None else None,
                                                    job.scored))
                continue
            rows.append(row)
        return rows

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-row logits processing and sampling; rows that fail here are marked and sampled harmlessly."""
        bad = ~(scores.amax(-1) < float("inf"))  # NaN or +inf: the weights are broken
        if bool(bad.any()):
            for i in bad.nonzero()[:, 0].tolist():
                self.rows[i].error = NonFiniteOutputError("the model produced non-finite logits (NaN or inf); its "
                                                          "weights are likely corrupt")
            scores = scores.masked_fill(bad[:, None], 0.0)
        recorded = [i for i, r in enumerate(self.rows) if r.job.item.params.logprobs is not None]
        raw = torch.log_softmax(scores[recorded], dim=-1) if recorded else None  # the model's own distribution
        adjusting = [i for i, r in enumerate(self.rows) if r.job.item.params.adjusts_logits]
        if adjusting:
            scores = scores.clone()
            for i in adjusting:
                try:
                    scores[i] = self._adjusted(self.rows[i], scores[i:i + 1])[0]
                except Exception as exc:  # noqa: BLE001 - this row's failure is its own
                    self.rows[i].error = exc
                    scores[i] = 0.0
        tokens = self.sampler.choose(scores)
        if recorded:
            self._record(recorded, raw, tokens)
        return tokens

    def _adjusted(self, row: _Row, scores: torch.Tensor) -> torch.Tensor:
        p, vocab = row.job.item.params, scores.shape[-1]
        if p.repetition_penalty != 1.0 and row.in_prompt is None:
            ids = torch.tensor([row.job.item.prompt_ids], device=scores.device)
            row.in_prompt = prompt_presence(ids, torch.ones_like(ids), vocab, scores.dtype)
        if p.logit_bias and row.bias is None:
            row.bias = bias_vector(p, vocab, scores.dtype, scores.device)
        new = torch.tensor([row.new], dtype=torch.long, device=scores.device)
        return adjust_scores(p, scores, new, row.in_prompt, row.bias, self.policy.tokenizer.eos_token_id)

    def _record(self, recorded: list[int], raw: torch.Tensor, tokens: torch.Tensor) -> None:
        chosen = tokens[recorded]
        lp = raw.gather(1, chosen[:, None])[:, 0].tolist()
        ks = [self.rows[i].job.item.params.logprobs for i in recorded]
        top = raw.topk(min(max(ks), raw.shape[-1]), dim=-1) if max(ks) else None
        values, ids = (top.values.tolist(), top.indices.tolist()) if top is not None else (None, None)
        for j, (i, token) in enumerate(zip(recorded, chosen.tolist())):
            row = self.rows[i]
            best = tuple(zip(ids[j][: ks[j]], values[j][: ks[j]])) if ks[j] else ()
            if row.logprobs is None:
                row.logprobs = []
            row.logprobs.append(TokenLogprob(token, lp[j], best))

    def _advance(self, tokens: list[int]) -> list[int]:
        """Append each row's token, hand it to its stream; the rows that are finished now."""
        eos = self.policy.tokenizer.eos_token_id
        finished = []
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            job, p = row.job, row.job.item.params
            if row.error is not None:
                job.fail(row.error)
                finished.append(i)
                continue
            if job.gone:
                finished.append(i)
                continue
            row.new.append(token)
            if job.first_token is None:
                job.first_token = now
                if self._on_first_token is not None:
                    self._on_first_token(now - job.submitted)
            if job.on_token is not None:
                try:
                    job.on_token(token, row.logprobs[-1] if row.logprobs else None)
                except Exception as exc:  # noqa: BLE001 - a broken consumer ends its own stream only
                    job.fail(exc)
                    finished.append(i)
                    continue
            if (token == eos or len(row.new) >= p.max_new_tokens
                    or (p.stop and _finish(self.policy, row.new, p).finish_reason == "stop")):
                finished.append(i)
        return finished

    def _retire(self, indices: list[int], done: bool) -> None:
        """Rows leave the batch; with `done`, the unfailed ones deliver their completions."""
        if not indices:
            return
        leaving = set(indices)
        for i in indices:
            row = self.rows[i]
            if done and not row.job.gone:
                row.job.finish_row(row.draw, self._completion(row))
            elif row.job.should_stop is not None and not row.job.over:  # a stream told to stop: it ends quietly
                row.job.finish_row(row.draw, None)
        keep = [i for i in range(len(self.rows)) if i not in leaving]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._reset()
            return
        self.batch.keep(keep)
        self.last = self.last[torch.tensor(keep, dtype=torch.long, device=self.last.device)]
        self.sampler = None

    def _completion(self, row: _Row) -> Completion | None:
        if row.job.on_token is not None:
            return None  # the stream assembles its own
        c = _finish(self.policy, row.new, row.job.item.params)
        if row.logprobs is not None:
            c.logprobs = row.logprobs[: c.kept]
        c.prompt_logprobs = row.job.scored
        return c
