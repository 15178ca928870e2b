"""The scores contract, checked wherever scores arrive: exactly one finite number per text.

Standard library only: the framework adapters (shared/frameworks) load it through shared.clients in environments
that hold little else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def non_finite_positions(values: Sequence[float]) -> list[int]:
    """Where `values` holds NaN or an infinity."""
    return [i for i, v in enumerate(values) if not math.isfinite(v)]


def one_finite_score_each(raw: Any, expected: int, source: str, error: type[Exception]) -> list[float]:
    """The scores contract, wherever scores arrive (the reward service's answer, a reward function's): exactly one
    finite number per text, as floats, or `error` with a message that names `source`. A bad score must never reach
    a PPO update."""
    if raw is None or isinstance(raw, (str, bytes, dict)) or not isinstance(raw, Iterable):
        raise error(f"{source} returned no scores for {expected} texts")
    values = list(raw)
    if len(values) != expected:
        raise error(f"{source} returned {len(values)} scores for {expected} texts")
    numbers = [_number(value) for value in values]
    if not_numbers := [i for i, s in enumerate(numbers) if s is None]:
        raise error(f"{source} returned scores that are not numbers at positions {not_numbers[:10]}")
    scores = [s for s in numbers if s is not None]
    if bad := non_finite_positions(scores):
        raise error(f"{source} returned non-finite scores at positions {bad[:10]}")
    return scores


def _number(value: Any) -> float | None:
    """`value` as a float when it is a number of any kind (int, numpy, a 0-d tensor); text that reads as one is
    not."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
