"""Generation: one `model.generate` call per batch of compatible requests, and token streaming.

Requests share a batch only when everything that shapes sampling is equal (checkpoint, parameters, stop strings).
A seeded request never shares its batch with another request, and the seed is set right before its call, so the
same seed and parameters give the same text however busy the server is.
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

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "num_beams": 1}
        # Every knob explicit: a model's generation_config may carry its own defaults (top_k 50 in many).
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


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


@dataclass
class Completion:
    completion: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    tokens: int  # completion tokens, the EOS not counted


def sampling_params(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                    num_return_sequences: int, stop: tuple[str, ...], do_sample: bool = True) -> SamplingParams:
    """Greedy when asked or when the temperature is too small to divide by; greedy ignores the sampling knobs (and
    the seed), so every greedy request with the same length and stops can share a batch."""
    if not do_sample or temperature < GREEDY_BELOW:
        return SamplingParams(max_new_tokens, False, 1.0, 1.0, 0, None, num_return_sequences, stop)
    return SamplingParams(max_new_tokens, True, temperature, top_p, top_k, seed, num_return_sequences, stop)


def new_request_id() -> int:
    return next(_request_ids)


def tokenize_prompts(policy: LoadedPolicy, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt; an empty prompt becomes the BOS token, as GPT-2 needs something to continue."""
    ids = policy.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    bos = policy.tokenizer.bos_token_id if policy.tokenizer.bos_token_id is not None else \
        policy.tokenizer.eos_token_id
    return [seq if seq else [bos] for seq in ids]


def _finish(policy: LoadedPolicy, new_ids: list[int], stop: tuple[str, ...]) -> Completion:
    """Cut at EOS or the first stop string; the rest is the completion."""
    eos = policy.tokenizer.eos_token_id
    reason = "length"
    if eos in new_ids:
        new_ids, reason = new_ids[: new_ids.index(eos)], "stop"
    text = policy.tokenizer.decode(new_ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if cuts:
        text, reason = text[: min(cuts)], "stop"
        new_ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
    return Completion(text, reason, len(new_ids))


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


class _RefuseNonFinite(LogitsProcessor):
    """Fails the call on NaN or +inf logits (sampling would crash on them, greedy would emit garbage); -inf is fine:
    top-k and top-p mask tokens with it."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not bool(scores.max() < float("inf")):  # max is NaN when any score is
            raise NonFiniteOutputError("the model produced non-finite logits (NaN or inf); its weights are likely "
                                       "corrupt")
        return scores


def _common_kwargs(policy: LoadedPolicy, params: SamplingParams) -> dict:
    return {"max_new_tokens": params.max_new_tokens, "pad_token_id": policy.tokenizer.pad_token_id,
            "eos_token_id": policy.tokenizer.eos_token_id,
            "logits_processor": LogitsProcessorList([_RefuseNonFinite()]), **params.generate_kwargs()}


@torch.inference_mode()
def generate_batch(items: list[GenerationItem]) -> list[list[Completion]]:
    """Run one generate call for items that share a batch key; per item, its `num_return_sequences` completions."""
    policy, params = items[0].policy, items[0].params
    ids, mask = _padded(policy, [it.prompt_ids for it in items])
    n = params.num_return_sequences
    draws = n if params.do_sample else 1  # greedy choices are all the same: decode once, copy
    with _generate_lock:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = policy.model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=draws,
                                    **_common_kwargs(policy, params))  # (B * draws, T + new)
    new = out[:, ids.shape[1]:].tolist()
    return [[_finish(policy, new[i * draws + j % draws], params.stop) for j in range(n)] for i in range(len(items))]


class _CallbackStreamer(BaseStreamer):
    """Hands each new token id to `on_token` (from the generate thread); skips the prompt echo."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(token)

    def end(self) -> None:
        pass


class _WhenAsked(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_streaming(item: GenerationItem, on_token: Callable[[int], None], should_stop: Callable[[], bool]) -> None:
    """One sequence, token by token (HF streamers take a batch of one); ends early once `should_stop()`."""
    policy, params = item.policy, item.params
    ids, mask = _padded(policy, [item.prompt_ids])
    with _generate_lock:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        if should_stop():  # abandoned while waiting for the lock
            return
        policy.model.generate(
            input_ids=ids, attention_mask=mask, streamer=_CallbackStreamer(on_token),
            stopping_criteria=StoppingCriteriaList([_WhenAsked(should_stop)]), **_common_kwargs(policy, params),
        )


def finish_stream(policy: LoadedPolicy, new_ids: list[int], stop: tuple[str, ...]) -> Completion:
    return _finish(policy, new_ids, stop)
