"""Reward functions for TRL 1.x trainers (GRPO, RLOO, online DPO), backed by the reward service.

    from trl import GRPOConfig, GRPOTrainer
    from shared.frameworks.trl import RemoteReward

    trainer = GRPOTrainer(model=..., args=GRPOConfig(...), train_dataset=...,
                          reward_funcs=[RemoteReward("http://127.0.0.1:8000", label="POSITIVE")])

How TRL calls a reward function (TRL 1.16: `GRPOTrainer._calculate_rewards`, `RLOOTrainer._calculate_rewards`,
`trl.experimental.online_dpo.OnlineDPOTrainer._calculate_rewards_from_functions`): by keyword,
`func(prompts=[...], completions=[...], completion_ids=[...], **kwargs)`, one row per completion (a prompt repeats
once per generation); `kwargs` holds every other dataset column (one value per row), `trainer_state`, and in GRPO and
RLOO also `log_extra`, `log_metric` and, with environments, `environments`. It wants one value per completion; None
means "no reward for this sample" (TRL makes it NaN and leaves this function out of that sample's sum). The metrics
name a function by its `__name__` (`rewards/<__name__>/mean`), an instance without one by its class name.
Async: GRPO and RLOO await a function whose `__call__` is `async def` (all async reward functions of a batch run
concurrently on one event loop in a daemon thread); online DPO only calls synchronously, so use `RemoteReward` there.

What is scored, per completion:
- Standard (plain-text) samples: `prompt + completion`, joined exactly as TRL joins them for a reward model, so a
  classifier sees the text the policy continued (the trlX sentiment recipe); `include_prompt=False` scores the
  completion alone.
- Conversational samples (lists of `{"role", "content"}` messages): the text of the prompt's last user message and
  the completion's last assistant message with text (after tool calls, the final answer), joined by a newline;
  content given as a list of parts contributes its text parts. `include_prompt=False` scores the assistant text
  alone. A completion with no assistant text, or any empty text, is not sent and gets None.
- `to_text=fn` replaces both rules: `fn(prompt, completion) -> str` (e.g. a chat template); '' means None.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from shared.clients import AsyncRewardClient, RetryPolicy, RewardClient, ServiceError
from shared.frameworks import env_settings, last_message_text

log = logging.getLogger(__name__)

__all__ = ["RemoteReward", "AsyncRemoteReward", "sample_text"]

ON_ERROR = ("raise", "none")


def _is_messages(x: Any) -> bool:
    return isinstance(x, dict) or (isinstance(x, list) and all(isinstance(m, dict) for m in x) and len(x) > 0)


def sample_text(prompt: Any, completion: Any, include_prompt: bool = True) -> str:
    """The text the service scores for one (prompt, completion) pair; '' when there is nothing to score."""
    if _is_messages(completion) or _is_messages(prompt):
        reply = last_message_text(completion, "assistant")
        if not reply:
            return ""
        asked = last_message_text(prompt, "user") if include_prompt else ""
        return f"{asked}\n{reply}" if asked else reply
    completion = completion or ""
    if include_prompt and isinstance(prompt, str):
        return prompt + completion
    return completion


def _default_name(model: str | None, label: str | None) -> str:
    parts = ["reward_service", *(p for p in (model, label) if p)]
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", "_".join(parts))


class _RemoteRewardBase:
    """What the sync and async reward functions share: settings, naming, the text rules, pickling."""

    def __init__(self, url: str | None = None, *, label: str | None = None, model: str | None = None,
                 api_key: str | None = None, name: str | None = None, include_prompt: bool = True,
                 to_text: Callable[[Any, Any], str] | None = None, on_error: str = "raise",
                 timeout: float = 60.0, retry: RetryPolicy | None = None, chunk_size: int = 256,
                 **client_kwargs: Any):
        """`url`, `label`, `model` and `api_key` default to RLHF_REWARD_URL (else http://127.0.0.1:8000),
        RLHF_REWARD_LABEL, RLHF_REWARD_MODEL and REWARD_API_KEY (or RLHF_API_KEY); `label`/`model` None means the
        service's defaults. `name` is what TRL logs it as (default `reward_service[_<model>][_<label>]`).
        `on_error="none"` turns a call the service fails for good (after the client's retries) into None for every
        sample instead of an exception: only for a reward that may be missing while others carry training.
        `timeout`, `retry`, `chunk_size` and other keywords go to the client."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        env = env_settings()
        self.url = url or env["url"]
        self.label = label if label is not None else env["label"]
        self.model = model if model is not None else env["model"]
        self.api_key = api_key if api_key is not None else env["api_key"]
        self.__name__ = name or _default_name(self.model, self.label)
        self.include_prompt, self.to_text, self.on_error = include_prompt, to_text, on_error
        self.client_kwargs = {"timeout": timeout, "retry": retry or RetryPolicy(), "chunk_size": chunk_size,
                              **client_kwargs}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.url!r}, label={self.label!r}, model={self.model!r}, "
                f"name={self.__name__!r})")

    def texts(self, prompts: Sequence[Any] | None, completions: Sequence[Any]) -> list[str]:
        """One text per completion ('' where there is nothing to score)."""
        if prompts is None:
            prompts = [None] * len(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if self.to_text is not None:
            return [self.to_text(p, c) or "" for p, c in zip(prompts, completions)]
        return [sample_text(p, c, self.include_prompt) for p, c in zip(prompts, completions)]

    def _failed(self, exc: ServiceError, n: int) -> list[float | None]:
        if self.on_error == "raise":
            raise exc
        log.warning("%s: the reward service failed (%s); %d samples get no reward (None)", self.__name__, exc, n)
        return [None] * n

    @staticmethod
    def _merge(texts: list[str], scores: list[float]) -> list[float | None]:
        it = iter(scores)
        return [next(it) if t else None for t in texts]

    def _client_args(self) -> dict[str, Any]:
        return {"model": self.model, "label": self.label, "api_key": self.api_key, **self.client_kwargs}

    def __getstate__(self) -> dict[str, Any]:
        # Connections never travel: a copy (pickled for another process, or deep-copied) opens its own.
        state = dict(self.__dict__)
        state.pop("_client", None)
        state.pop("_clients", None)
        return state


class RemoteReward(_RemoteRewardBase):
    """A synchronous TRL reward function: `reward(prompts, completions, **kwargs) -> list[float | None]`.

    One blocking HTTP call per batch (split into `chunk_size` requests by the client, with its retries under one
    deadline). Works with every TRL trainer that takes `reward_funcs`. Picklable; the connection pool is opened on
    first use in each process.
    """

    _client: RewardClient | None = None

    @property
    def client(self) -> RewardClient:
        if self._client is None:
            self._client = RewardClient(self.url, **self._client_args())
        return self._client

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (),
                 **kwargs: Any) -> list[float | None]:
        texts = self.texts(prompts, completions)
        todo = [t for t in texts if t]
        try:
            scores = self.client.score(todo) if todo else []
        except ServiceError as exc:
            return self._failed(exc, len(texts))
        return self._merge(texts, scores)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class AsyncRemoteReward(_RemoteRewardBase):
    """The same reward, `async def __call__`: GRPOTrainer and RLOOTrainer await it on their event loop, concurrently
    with other async reward functions. A client (and its connection pool) is made per event loop, on first use.
    `max_concurrency` bounds the chunk requests in flight (default 4)."""

    def __init__(self, url: str | None = None, *, max_concurrency: int = 4, **kwargs: Any):
        super().__init__(url, max_concurrency=max_concurrency, **kwargs)
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clients = weakref.WeakKeyDictionary()

    @property
    def client(self) -> AsyncRewardClient:
        """The client of the running event loop."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = AsyncRewardClient(self.url, **self._client_args())
        return client

    async def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (),
                       **kwargs: Any) -> list[float | None]:
        texts = self.texts(prompts, completions)
        todo = [t for t in texts if t]
        try:
            scores = await self.client.score(todo) if todo else []
        except ServiceError as exc:
            return self._failed(exc, len(texts))
        return self._merge(texts, scores)

    async def aclose(self) -> None:
        """Close the running loop's client."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
