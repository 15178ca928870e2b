"""Generation pieces: sampling parameters, tokenization, logit adjustments, logprobs, cutting a completion at EOS or a
stop string (`_finish`); and static batching (`batching.mode: static`): one `model.generate` call per batch of
compatible requests, and one sequence's tokens as a generate call makes them (streaming.py turns tokens into text).
Continuous batching (scheduler.py) uses the same pieces.

In static batching requests share a batch only when everything that shapes sampling is equal (checkpoint,
parameters, stop strings). A seeded request never shares its batch with another request, and the seed is set right
before its call, so the same seed and parameters give the same text however busy the server is.

Log-probabilities (OpenAI `logprobs`) are those of the model's own distribution: log-softmax of the raw logits,
before logit bias, penalties, temperature and top-k / top-p / min-p (vLLM's default, `raw_logprobs`), so they do not
depend on how a token was chosen. Penalties, bias and min_tokens are applied after they are recorded and before
HF's temperature and truncation warpers, in vLLM's order.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from services.generator.checkpoints import LoadedPolicy

_request_ids = itertools.count()
GREEDY_BELOW = 1e-5  # a lower temperature is greedy decoding (as in vLLM): dividing logits by it overflows


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or +inf logits: its weights are broken, nothing a request can fix."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 40
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    num_return_sequences: int = 1
    stop: tuple[str, ...] = ()
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: tokens of the prompt and the output so far
    presence_penalty: float = 0.0  # OpenAI's: tokens of the output so far
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # no EOS and no stop string before this many new tokens
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # record each new token's logprob and the `logprobs` most likely tokens'
    prompt_logprobs: bool = False  # the same for the prompt's tokens (OpenAI echo + logprobs)

    def generate_kwargs(self) -> dict:
        # The penalties are ours (_Adjust): HF's own would run before the logprobs are recorded.
        if not self.do_sample:
            return {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
        # Every knob explicit: a model's generation_config may carry its own defaults (top_k 50 in many).
        extra = {"min_p": self.min_p} if self.min_p > 0 else {}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": 1.0, **extra}

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.min_tokens or self.logit_bias)


@dataclass
class GenerationItem:
    """One prompt of one request, tokenized, bound to the loaded policy that will serve it."""

    policy: LoadedPolicy
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    request_id: int

    def batch_key(self) -> Hashable:
        # Seeded requests batch only with their own prompts: their randomness must not depend on neighbours.
        owner = self.request_id if self.params.seed is not None else None
        return id(self.policy), self.params, owner

    def cost(self) -> int:
        return (len(self.prompt_ids) + self.params.max_new_tokens) * self.params.num_return_sequences


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None: the prompt's first token, which nothing before it conditions
    top: tuple[tuple[int, float], ...]  # the most likely tokens at this position, most likely first


OnToken = Callable[[int, TokenLogprob | None], None]  # a streamed token, from the thread that made it


@dataclass
class Completion:
    completion: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    tokens: int  # completion tokens, the EOS not counted
    kept: int = 0  # generated tokens behind the text: up to EOS, or to the one a stop string starts in
    logprobs: list[TokenLogprob] | None = None  # per kept token, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token, when asked (echo)


def sampling_params(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                    num_return_sequences: int, stop: tuple[str, ...], do_sample: bool = True,
                    **extra) -> SamplingParams:
    """Greedy when asked or when the temperature is too small to divide by; greedy ignores the sampling knobs (and
    the seed), so every greedy request with the same length and stops can share a batch. `extra`: the other
    SamplingParams fields (penalties, bias, min_tokens, logprobs), which greedy decoding honours too."""
    if not do_sample or temperature < GREEDY_BELOW:
        extra.pop("min_p", None)
        return SamplingParams(max_new_tokens, False, 1.0, 1.0, 0, None, num_return_sequences, stop, **extra)
    return SamplingParams(max_new_tokens, True, temperature, top_p, top_k, seed, num_return_sequences, stop, **extra)


def new_request_id() -> int:
    return next(_request_ids)


def tokenize_prompts(policy: LoadedPolicy, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt; an empty prompt becomes the BOS token, as GPT-2 needs something to continue."""
    ids = policy.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    bos = policy.tokenizer.bos_token_id if policy.tokenizer.bos_token_id is not None else \
        policy.tokenizer.eos_token_id
    return [seq if seq else [bos] for seq in ids]


def _decoded_length(policy: LoadedPolicy, ids: list[int]) -> int:
    return len(policy.tokenizer.decode(ids, skip_special_tokens=True))


def covering(policy: LoadedPolicy, ids: list[int], chars: int) -> int:
    """The fewest leading tokens of `ids` whose text is at least `chars` characters long."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if _decoded_length(policy, ids[:mid]) >= chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def within(policy: LoadedPolicy, ids: list[int], chars: int) -> int:
    """The most leading tokens of `ids` whose text is at most `chars` characters long."""
    if _decoded_length(policy, ids) <= chars:
        return len(ids)
    return max(covering(policy, ids, chars + 1) - 1, 0)


def _finish(policy: LoadedPolicy, new_ids: list[int], params: SamplingParams) -> Completion:
    """Cut at EOS or the first stop string (one ending past the first `min_tokens` tokens); the rest is the
    completion."""
    eos = policy.tokenizer.eos_token_id
    reason = "length"
    if eos in new_ids:
        new_ids, reason = new_ids[: new_ids.index(eos)], "stop"
    text = policy.tokenizer.decode(new_ids, skip_special_tokens=True)
    floor = _decoded_length(policy, new_ids[: params.min_tokens - 1]) if params.min_tokens > 1 else 0
    cuts = [i for i in (text.find(s, max(floor - len(s) + 1, 0)) for s in params.stop if s) if i >= 0]
    if cuts:
        text, reason = text[: min(cuts)], "stop"
        kept = covering(policy, new_ids, len(text))
        return Completion(text, reason, len(policy.tokenizer(text, add_special_tokens=False)["input_ids"]), kept)
    return Completion(text, reason, len(new_ids), len(new_ids))


def _padded(policy: LoadedPolicy, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, (B, T)."""
    pad = policy.tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(prompts):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    device = policy.model.device
    return ids.to(device), mask.to(device)


_generate_lock = threading.Lock()  # seeding and sampling must not interleave between two generate calls


class _CaptureLogprobs(LogitsProcessor):
    """Records each step's log-probabilities under the model's own distribution (it runs first, on the raw logits):
    the chosen token's and the `k` most likely. A step is closed once its token is known: at the next call (from
    the ids) or when a streamer or the caller hands it over, whichever comes first."""

    def __init__(self, k: int):
        self.k = k
        self.last: torch.Tensor | None = None  # (rows, V) log-probs of the open step
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.close(input_ids[:, -1])
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def close(self, chosen: torch.Tensor) -> None:
        """The open step chose `chosen` (rows,)."""
        chosen = chosen.to(self.last.device)
        lp = self.last.gather(1, chosen[:, None])[:, 0]  # (rows,)
        top = self.last.topk(min(self.k, self.last.shape[-1]), dim=-1) if self.k else None
        self.steps.append((chosen, lp, top.values if top else None, top.indices if top else None))
        self.last = None

    def at(self, step: int, row: int = 0) -> TokenLogprob:
        chosen, lp, values, ids = self.steps[step]
        top = tuple(zip(ids[row].tolist(), values[row].tolist())) if self.k else ()
        return TokenLogprob(int(chosen[row]), float(lp[row]), top)

    def rows(self, steps: int) -> list[list[TokenLogprob]]:
        """Per row, the first `steps` steps."""
        taken = self.steps[:steps]
        if not taken:
            return []
        chosen = torch.stack([s[0] for s in taken], 1).tolist()  # (rows, steps)
        lp = torch.stack([s[1] for s in taken], 1).tolist()
        rows = len(chosen)
        if self.k:
            values = torch.stack([s[2] for s in taken], 1).tolist()  # (rows, steps, k)
            ids = torch.stack([s[3] for s in taken], 1).tolist()
            tops = [[tuple(zip(ids[r][t], values[r][t])) for t in range(len(taken))] for r in range(rows)]
        else:
            tops = [[()] * len(taken) for _ in range(rows)]
        return [[TokenLogprob(chosen[r][t], lp[r][t], tops[r][t]) for t in range(len(taken))] for r in range(rows)]


def prompt_presence(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vocab: int, dtype) -> torch.Tensor:
    """(rows, V): which tokens each (left-padded) prompt holds, padding excluded; for the repetition penalty."""
    return torch.zeros((prompt_ids.shape[0], vocab), dtype=dtype, device=prompt_ids.device).scatter_add_(
        1, prompt_ids, prompt_mask.to(dtype)) > 0


def bias_vector(params: SamplingParams, vocab: int, dtype, device) -> torch.Tensor:
    bias = torch.zeros(vocab, dtype=dtype, device=device)
    for token, value in params.logit_bias:
        bias[token] = value
    return bias


def adjust_scores(params: SamplingParams, scores: torch.Tensor, new: torch.Tensor, in_prompt: torch.Tensor | None,
                  bias: torch.Tensor | None, eos: int | None) -> torch.Tensor:
    """OpenAI's and vLLM's logit adjustments on (rows, V) scores, given each row's new tokens so far (rows, steps):
    min_tokens (no EOS yet), logit_bias, repetition penalty (tokens of the prompt, `in_prompt`, and of the output),
    presence and frequency penalties (tokens of the output)."""
    p = params
    scores = scores.clone()
    if new.shape[1] < p.min_tokens and eos is not None:
        scores[:, eos] = -float("inf")
    if bias is not None:
        scores += bias
    if p.repetition_penalty != 1.0:
        seen = in_prompt.clone().scatter_(1, new, True)
        penalized = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        scores = torch.where(seen, penalized, scores)
    if p.presence_penalty or p.frequency_penalty:
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(scores.dtype)
    return scores


class _Adjust(LogitsProcessor):
    """`adjust_scores` inside `generate`, after the logprobs are recorded and before temperature and truncation."""

    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, eos: int | None):
        self.params, self.eos = params, eos
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask  # (B, T)
        self.width = prompt_ids.shape[1]
        self.in_prompt: torch.Tensor | None = None  # (rows, V): which tokens the prompt holds
        self.bias: torch.Tensor | None = None  # (V,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        p = self.params
        rows, vocab = scores.shape
        if p.logit_bias and self.bias is None:
            self.bias = bias_vector(p, vocab, scores.dtype, scores.device)
        if p.repetition_penalty != 1.0 and self.in_prompt is None:
            reps = rows // self.prompt_ids.shape[0]  # generate repeats each prompt num_return_sequences times
            self.in_prompt = prompt_presence(self.prompt_ids.repeat_interleave(reps, 0),
                                             self.prompt_mask.repeat_interleave(reps, 0), vocab, scores.dtype)
        # all real tokens while a row is unfinished
        return adjust_scores(p, scores, input_ids[:, self.width:], self.in_prompt, self.bias, self.eos)


class _RefuseNonFinite(LogitsProcessor):
    """Fails the call on NaN or +inf logits (sampling would crash on them, greedy would emit garbage); -inf is fine:
    top-k and top-p mask tokens with it."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not bool(scores.max() < float("inf")):  # max is NaN when any score is
            raise NonFiniteOutputError("the model produced non-finite logits (NaN or inf); its weights are likely "
                                       "corrupt")
        return scores


def _common_kwargs(policy: LoadedPolicy, params: SamplingParams, ids: torch.Tensor, mask: torch.Tensor,
                   capture: _CaptureLogprobs | None) -> dict:
    processors = [capture] if capture else []
    if params.adjusts_logits:
        processors.append(_Adjust(params, ids, mask, policy.tokenizer.eos_token_id))
    return {"max_new_tokens": params.max_new_tokens, "pad_token_id": policy.tokenizer.pad_token_id,
            "eos_token_id": policy.tokenizer.eos_token_id,
            "logits_processor": LogitsProcessorList([*processors, _RefuseNonFinite()]), **params.generate_kwargs()}


def _score_prompt(policy: LoadedPolicy, prompt_ids: list[int], k: int) -> list[TokenLogprob]:
    """Each prompt token's logprob given the tokens before it (the first has none) and the `k` most likely there."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=policy.model.device)  # (1, T)
    logits = policy.model(input_ids=ids).logits[0, :-1].float()  # (T - 1, V)
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError("the model produced non-finite logits (NaN or inf); its weights are likely corrupt")
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, ids[0, 1:, None])[:, 0].tolist()
    tops: list = [()] * len(chosen)
    if k:
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    return [TokenLogprob(prompt_ids[0], None, ()),
            *(TokenLogprob(t, c, top) for t, c, top in zip(prompt_ids[1:], chosen, tops))]


@torch.inference_mode()
def score_prompt(policy: LoadedPolicy, prompt_ids: list[int], k: int) -> list[TokenLogprob]:
    with _generate_lock:
        return _score_prompt(policy, prompt_ids, k)


@torch.inference_mode()
def generate_batch(items: list[GenerationItem]) -> list[list[Completion]]:
    """Run one generate call for items that share a batch key; per item, its `num_return_sequences` completions."""
    policy, params = items[0].policy, items[0].params
    n = params.num_return_sequences
    scored = [score_prompt(policy, it.prompt_ids, params.logprobs or 0) if params.prompt_logprobs else None
              for it in items]
    if params.max_new_tokens == 0:  # echo only: the prompt scored, nothing generated
        nothing = [] if params.logprobs is not None else None
        return [[Completion("", "length", 0, 0, nothing, scored[i]) for _ in range(n)] for i in range(len(items))]
    ids, mask = _padded(policy, [it.prompt_ids for it in items])
    draws = n if params.do_sample else 1  # greedy choices are all the same: decode once, copy
    capture = _CaptureLogprobs(params.logprobs) if params.logprobs is not None else None
    with _generate_lock:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = policy.model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=draws,
                                    **_common_kwargs(policy, params, ids, mask, capture))  # (B * draws, T + new)
    steps = out.shape[1] - ids.shape[1]
    if capture and len(capture.steps) < steps:
        capture.close(out[:, -1])
    per_row = capture.rows(steps) if capture else None
    new = out[:, ids.shape[1]:].tolist()
    results = []
    for i in range(len(items)):
        row = []
        for j in range(n):
            c = _finish(policy, new[i * draws + j % draws], params)
            if per_row is not None:
                c.logprobs = per_row[i * draws + j % draws][: c.kept]
            c.prompt_logprobs = scored[i]
            row.append(c)
        results.append(row)
    return results


class _CallbackStreamer(BaseStreamer):
    """Hands each new token id (and its logprobs, when recorded) to `on_token` (from the generate thread); skips the
    prompt echo."""

    def __init__(self, on_token: OnToken, capture: _CaptureLogprobs | None):
        self.on_token, self.capture, self.prompt_seen, self.count = on_token, capture, False, 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            info = None
            if self.capture is not None:
                if len(self.capture.steps) <= self.count:  # not yet closed by the next step's call
                    self.capture.close(torch.tensor([token]))
                info = self.capture.at(self.count)
            self.count += 1
            self.on_token(token, info)

    def end(self) -> None:
        pass


class _WhenAsked(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_streaming(item: GenerationItem, on_token: OnToken, should_stop: Callable[[], bool]) -> None:
    """One sequence, token by token (HF streamers take a batch of one); ends early once `should_stop()`."""
    policy, params = item.policy, item.params
    if params.max_new_tokens == 0:
        return
    ids, mask = _padded(policy, [item.prompt_ids])
    capture = _CaptureLogprobs(params.logprobs) if params.logprobs is not None else None
    with _generate_lock:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        if should_stop():  # abandoned while waiting for the lock
            return
        policy.model.generate(
            input_ids=ids, attention_mask=mask, streamer=_CallbackStreamer(on_token, capture),
            stopping_criteria=StoppingCriteriaList([_WhenAsked(should_stop)]),
            **_common_kwargs(policy, params, ids, mask, capture),
        )


def finish_stream(policy: LoadedPolicy, new_ids: list[int], params: SamplingParams) -> Completion:
    return _finish(policy, new_ids, params)
