"""A veRL custom reward function module backed by the reward service.

    reward.custom_reward_function.path=pkg://shared.frameworks.verl     # or the file: <repo>/shared/frameworks/verl.py
    reward.custom_reward_function.name=compute_score                   # or compute_score_async
    +reward.custom_reward_function.reward_kwargs.url=http://127.0.0.1:8000
    +reward.custom_reward_function.reward_kwargs.label=POSITIVE

How veRL calls it (0.9.1, `verl.trainer.ppo.reward.get_custom_reward_fn` and the reward loop's managers in
`verl.experimental.reward_loop.reward_manager`: naive, the default, and limited, dapo, remote): once per sample, by
keyword, `compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **reward_kwargs)`, where
`solution_str` is the decoded response alone (no prompt) and `reward_kwargs` is `custom_reward_function.reward_kwargs`
from the config (they win over anything else passed under the same name; with a reward model router it also passes
`reward_router_address` and `reward_model_tokenizer`, ignored here). It wants a float (or a dict with "score").
A sync function runs in the loop's thread pool, so samples go out concurrently as one-text requests that the service
batches; `compute_score_async` is awaited on the loop instead (naive, limited and dapo accept async functions; the
`remote` manager does not). `compute_score_batch` has the batched shape of veRL's legacy `BatchRewardManager`
(`verl.workers.reward_manager.batch`, registry name "batch"): `data_sources, solution_strs, ground_truths,
extra_infos, **reward_kwargs` -> one float per sample. In 0.9.1 that manager still ships, but the PPO trainer builds
its reward managers from the reward-loop registry, which has no batch manager.

Settings, each from `reward_kwargs` first, then the environment (which veRL's Ray workers inherit when they start
on this machine; `ray_kwargs.ray_init.runtime_env.env_vars` carries it elsewhere), then the default:
- `url`: RLHF_REWARD_URL, default http://127.0.0.1:8000 (several replicas: a list or comma-separated, as
  `RewardClient` takes them; `compute_score_async` takes one URL)
- `label`, `model`: RLHF_REWARD_LABEL, RLHF_REWARD_MODEL; unset means the service's defaults
- `api_key`: REWARD_API_KEY or RLHF_API_KEY
- `timeout` (s, per attempt; the client retries under a 120 s deadline)
- `prompt_key`: score `extra_info[prompt_key] + solution_str` (e.g. a dataset that keeps the question in
  extra_info); default: the response alone
- `empty_score` (default 0.0): the reward of an empty text, which the service refuses to score

The file imports only `shared.clients`; loaded by path from an environment without this project installed, it puts
its own repository on `sys.path` first.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from shared.clients import AsyncRewardClient, RewardClient
    from shared.frameworks import env_settings
except ImportError:  # loaded by file path (custom_reward_function.path=...) without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from shared.clients import AsyncRewardClient, RewardClient
    from shared.frameworks import env_settings

__all__ = ["compute_score", "compute_score_async", "compute_score_batch"]

_lock = threading.Lock()
_clients: dict[tuple, RewardClient] = {}
_async_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> {settings: client}


def _settings(kwargs: dict[str, Any]) -> tuple:
    env = env_settings()
    url = kwargs.get("url") or env["url"]
    if not isinstance(url, str):  # a list of replicas (from YAML: an OmegaConf ListConfig)
        url = ",".join(str(u) for u in url)
    return (url, kwargs.get("api_key") or env["api_key"],
            kwargs.get("model") or env["model"], kwargs.get("label") or env["label"],
            float(kwargs.get("timeout") or 60.0))


def _client(kwargs: dict[str, Any]) -> RewardClient:
    key = _settings(kwargs)
    with _lock:
        client = _clients.get(key)
        if client is None:
            url, api_key, model, label, timeout = key
            client = _clients[key] = RewardClient(url, api_key=api_key, model=model, label=label, timeout=timeout)
        return client


def _async_client(kwargs: dict[str, Any]) -> AsyncRewardClient:
    key = _settings(kwargs)
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(key)
    if client is None:
        url, api_key, model, label, timeout = key
        if "," in url:
            raise ValueError(f"compute_score_async takes one reward service URL, not {url!r}: use compute_score "
                             "(or a load balancer) for several replicas")
        client = per_loop[key] = AsyncRewardClient(url, api_key=api_key, model=model, label=label, timeout=timeout)
    return client


def _text(solution_str: str, extra_info: Any, kwargs: dict[str, Any]) -> str:
    solution_str = solution_str or ""
    key = kwargs.get("prompt_key")
    if key and isinstance(extra_info, dict) and isinstance(extra_info.get(key), str):
        return extra_info[key] + solution_str
    return solution_str


def compute_score(data_source: Any = None, solution_str: str = "", ground_truth: Any = None,
                  extra_info: dict | None = None, **kwargs: Any) -> float:
    """The service's score of one response (`data_source` and `ground_truth` are not used: the service is the
    judge). Raises `shared.clients.ServiceError` when the service fails for good."""
    text = _text(solution_str, extra_info, kwargs)
    if not text:
        return float(kwargs.get("empty_score", 0.0))
    return _client(kwargs).score([text])[0]


async def compute_score_async(data_source: Any = None, solution_str: str = "", ground_truth: Any = None,
                              extra_info: dict | None = None, **kwargs: Any) -> float:
    """`compute_score` for an event loop: veRL's reward loop awaits it instead of running it in a thread."""
    text = _text(solution_str, extra_info, kwargs)
    if not text:
        return float(kwargs.get("empty_score", 0.0))
    return (await _async_client(kwargs).score([text]))[0]


def compute_score_batch(data_sources: Sequence[Any] | None = None, solution_strs: Sequence[str] = (),
                        ground_truths: Sequence[Any] | None = None, extra_infos: Sequence[Any] | None = None,
                        **kwargs: Any) -> list[float]:
    """One float per response, in one scoring call (chunked by the client): veRL's BatchRewardManager shape."""
    if extra_infos is None:
        extra_infos = [None] * len(solution_strs)
    if len(extra_infos) != len(solution_strs):
        raise ValueError(f"{len(extra_infos)} extra_infos for {len(solution_strs)} solution_strs")
    texts = [_text(s, e, kwargs) for s, e in zip(solution_strs, extra_infos)]
    todo = [t for t in texts if t]
    scores = iter(_client(kwargs).score(todo) if todo else [])
    empty = float(kwargs.get("empty_score", 0.0))
    return [next(scores) if t else empty for t in texts]
