"""The one failure -> HTTP table (shared/errors.py) and the one scores contract (shared/scores.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.generator.checkpoints import LoadCapacityError, NotReadyError
from services.trainer.rewards import RewardError, checked_scores
from shared.batching import BatcherClosedError, BatchTimeoutError, QueueFullError, WorkerDiedError
from shared.errors import OverloadedError, UnavailableError, as_api_error
from shared.scores import one_finite_score_each


@pytest.mark.parametrize("exc, status, type, message", [
    (QueueFullError(9, 8), 429, "overloaded", "queue is full (9 of 8 items waiting); retry later"),
    (OverloadedError("too many streams"), 429, "overloaded", "too many streams"),
    (LoadCapacityError("cannot load now"), 429, "overloaded", "cannot load now"),  # by its base class
    (BatchTimeoutError("request not served within 1 s"), 503, "timeout", "request not served within 1 s"),
    (BatcherClosedError("closing"), 503, "unavailable", "closing; retry"),
    (WorkerDiedError("worker died"), 503, "unavailable", "worker died; retry"),
    (NotReadyError("the base model is still loading"), 503, "unavailable", "the base model is still loading"),
])
def test_each_listed_failure_answers_its_status_with_retry_after(exc, status, type, message):
    error = as_api_error(exc)
    assert (error.status, error.type, error.message) == (status, type, message)
    assert error.headers == {"Retry-After": "1"}


def test_an_unavailable_error_may_say_how_long_to_wait():
    assert as_api_error(UnavailableError("models loading", retry_after=2)).headers == {"Retry-After": "2"}


def test_what_the_table_does_not_list_is_left_to_the_caller():
    assert as_api_error(RuntimeError("the model broke")) is None
    assert as_api_error(ValueError("bad")) is None


@pytest.mark.parametrize("raw, message", [
    (None, "returned no scores for 2 texts"),
    ("0.5", "returned no scores for 2 texts"),
    ({"scores": [1, 2]}, "returned no scores for 2 texts"),
    ([0.5], "returned 1 scores for 2 texts"),
    ([0.5, "0.7"], "returned scores that are not numbers at positions [1]"),
    ([None, 0.5], "returned scores that are not numbers at positions [0]"),
    ([0.5, math.nan], "returned non-finite scores at positions [1]"),
    ([-math.inf, 0.5], "returned non-finite scores at positions [0]"),
])
def test_scores_that_break_the_contract_are_refused_with_the_same_message_everywhere(raw, message):
    with pytest.raises(ValueError, match=f"^reward service {message.replace('[', '.').replace(']', '.')}$"):
        one_finite_score_each(raw, 2, "reward service", ValueError)
    with pytest.raises(RewardError) as info:
        checked_scores(raw, 2)
    assert str(info.value) == f"reward function {message}"


def test_numbers_of_any_kind_are_scores():
    raw = [1, np.float32(0.5), torch.tensor(-2.0), True]
    assert one_finite_score_each(raw, 4, "reward function", ValueError) == [1.0, 0.5, -2.0, 1.0]
    assert checked_scores(iter([0.25, 0.75]), 2) == [0.25, 0.75]
