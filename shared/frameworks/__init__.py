"""Adapters that plug the reward service into other RL frameworks' own trainers.

- `shared.frameworks.trl`: `RemoteReward` / `AsyncRemoteReward`, reward functions for TRL 1.x `reward_funcs`
  (GRPOTrainer, RLOOTrainer, the experimental OnlineDPOTrainer).
- `shared.frameworks.verl`: `compute_score` / `compute_score_async` / `compute_score_batch`, a custom reward function
  module for veRL (`reward.custom_reward_function.path=...`).

Neither imports its framework: each only speaks HTTP to the service through `shared.clients`, so they also work
from an environment that has TRL 1.x or veRL and this project installed beside it (`make trl-env`).
"""

from __future__ import annotations

import os
from typing import TypedDict

DEFAULT_URL = "http://127.0.0.1:8000"


class RewardEnv(TypedDict):
    url: str  # never unset: DEFAULT_URL
    label: str | None
    model: str | None
    api_key: str | None


def env_settings() -> RewardEnv:
    """Where the service is and what to score, from the environment (the same names as `rlhf score`):
    RLHF_REWARD_URL, RLHF_REWARD_LABEL, RLHF_REWARD_MODEL, and the scoring key REWARD_API_KEY (or RLHF_API_KEY)."""
    return {
        "url": os.environ.get("RLHF_REWARD_URL") or DEFAULT_URL,
        "label": os.environ.get("RLHF_REWARD_LABEL") or None,
        "model": os.environ.get("RLHF_REWARD_MODEL") or None,
        "api_key": os.environ.get("REWARD_API_KEY") or os.environ.get("RLHF_API_KEY") or None,
    }


def content_text(content) -> str:
    """A message's `content` as text: a string as is, a list of content parts as its text parts joined by newlines
    (images and other parts are dropped), None as ''."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [(p.get("text") or "") if isinstance(p, dict) else str(p) for p in content]
        parts = [p for p in parts if isinstance(p, str) and p]
        return "\n".join(parts)
    return str(content)


def last_message_text(messages, role: str) -> str:
    """The text of the last message of `role` that has any text ('' when there is none). A single message (a dict)
    counts as a one-message list; a plain string is returned as is."""
    if isinstance(messages, str):
        return messages
    if isinstance(messages, dict):
        messages = [messages]
    for message in reversed(list(messages or [])):
        if isinstance(message, dict) and message.get("role") == role:
            text = content_text(message.get("content"))
            if text:
                return text
    return ""
