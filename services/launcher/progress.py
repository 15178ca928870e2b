"""Training as one live line, from the trainer's /v1/status."""

from __future__ import annotations

import shutil
import time
from typing import TextIO

import httpx

PLAIN_PROGRESS_EVERY_S = 10.0  # a log file or a pipe gets one progress line this often (and one per eval)
DONE_STATES = ("finished", "stopped", "failed")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds} s"


def status_from_metrics(records: list[dict], total: int, state: str) -> dict:
    """A status as /v1/status gives it, from the run's metrics lines: the last word on a trainer that has exited."""
    rollouts = [r for r in records if "rollout/reward_mean" in r]
    evals = [r for r in records if "eval/reward_mean" in r]
    last = rollouts[-1] if rollouts else {}
    return {"state": state, "step": last.get("step", 0), "total": total, "reward_mean": last.get("rollout/reward_mean"),
            "kl": last.get("objective/kl"), "eval_reward_mean": evals[-1]["eval/reward_mean"] if evals else None}


def status_line(status: dict) -> str:
    """The trainer's /v1/status as one line: iteration, rollout reward, KL, eval reward, ETA, and any note."""
    parts = [f"iteration {status.get('step', 0)}/{status.get('total', '?')}"]
    for key, label in (("reward_mean", "rollout reward"), ("kl", "KL"), ("eval_reward_mean", "eval reward")):
        if status.get(key) is not None:
            parts.append(f"{label} {status[key]:.3f}")
    if status.get("eta_seconds") is not None:
        parts.append(f"ETA {_duration(status['eta_seconds'])}")
    if status.get("state") not in (None, "running"):
        parts.append(str(status["state"]).replace("_", " "))
    if status.get("message"):
        parts.append(str(status["message"]))
    return "training: " + " | ".join(parts)


class TrainingProgress:
    """Training as one live line, rewritten in place on a terminal; elsewhere (a log, a pipe) a plain line at most
    every PLAIN_PROGRESS_EVERY_S seconds, and one at each eval and at the end."""

    def __init__(self, stream: TextIO, every: float = PLAIN_PROGRESS_EVERY_S):
        self.stream, self.every = stream, every
        self.tty = stream.isatty()
        self.last_line, self.last_eval, self.printed_at, self.live = "", None, float("-inf"), False

    def show(self, status: dict) -> None:
        if not status:
            return
        line = status_line(status)
        if line == self.last_line:
            return
        if self.tty:  # cut to the terminal's width: \r returns only to the start of the last wrapped row
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + line[:width] + "\x1b[K")  # \x1b[K: clear what a longer line left behind
            self.live = True
        elif (time.monotonic() - self.printed_at >= self.every or status.get("eval_reward_mean") != self.last_eval
              or status.get("state") in DONE_STATES or status.get("step") == status.get("total")):
            self.stream.write(line + "\n")
            self.printed_at = time.monotonic()
        self.stream.flush()
        self.last_line, self.last_eval = line, status.get("eval_reward_mean")

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
            self.live = False


def _fetch_status(url: str) -> dict | None:
    try:
        return httpx.get(url + "/v1/status", timeout=5).json()
    except (httpx.HTTPError, ValueError):  # starting, shutting down, or busy: the next poll tells
        return None

