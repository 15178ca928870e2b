"""Where a run's numbers go: `metrics.jsonl` in the run folder (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per line, each with `step`. On resume, lines past the resumed step (written by the
    killed run after its last checkpoint) are dropped, since those steps run again."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = True):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # a run from scratch (resume_step 0) starts an empty log
            kept = [line for line in self.path.read_text().splitlines()
                    if resume_step and line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.history: list[dict] = [json.loads(line) for line in self.path.read_text().splitlines()] \
            if self.path.exists() else []
        self._writer = self._tensorboard(run_dir) if tensorboard else None

    @staticmethod
    def _tensorboard(run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> dict:
        record = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.history.append(record)
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
        return record

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@dataclass
class TrainingStatus:
    """What the status API reports; written by the training thread, read by request handlers."""

    total: int
    state: str = "starting"  # starting, waiting_for_reward, running, stopping, finished, stopped, failed
    step: int = 0
    start_step: int = 0
    reward_mean: float | None = None
    eval_reward_mean: float | None = None
    kl: float | None = None
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    message: str | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    iteration_seconds: float | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)

    def eta_seconds(self) -> float | None:
        if self.iteration_seconds is None or self.state != "running":
            return None
        return (self.total - self.step) * self.iteration_seconds

    def as_dict(self) -> dict:
        return {"state": self.state, "step": self.step, "total": self.total, "reward_mean": self.reward_mean,
                "eval_reward_mean": self.eval_reward_mean, "kl": self.kl, "last_checkpoint": self.last_checkpoint,
                "best_checkpoint": self.best_checkpoint, "eta_seconds": self.eta_seconds(), "message": self.message,
                "error": self.error, "elapsed_seconds": time.time() - self.started_at}
