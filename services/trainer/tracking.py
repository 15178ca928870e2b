"""Where a run's numbers go: `metrics.jsonl` in the run folder (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.checkpoints import atomic_write_text

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per line, each with `step`. On resume, lines past the resumed step (written by the
    killed run after its last checkpoint) are dropped, since those steps run again; so is a line that does not parse
    (the torn last line of a process killed mid-write, or garbage), with a warning. `history` holds every record of
    the file, those of earlier processes of the run included."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = True):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.history: list[dict] = []
        if self.path.exists():  # a run from scratch (resume_step 0) starts an empty log
            self.history = [r for r in self._read() if resume_step and r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        self._writer = self._tensorboard(run_dir) if tensorboard else None

    def _read(self) -> list[dict]:
        lines = self.path.read_text(errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["step"] = int(record["step"])
            except (ValueError, TypeError, KeyError, IndexError):
                why = "a torn last line" if number == len(lines) else "not a JSON object with a step"
                log.warning("%s: dropping line %d (%s): %.80r", self.path, number, why, line)
                continue
            records.append(record)
        return records

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

    def sync(self) -> None:
        """Make the lines written so far durable: a checkpoint commits only after the metrics of its steps."""
        if self.path.exists():
            with self.path.open("a") as f:
                os.fsync(f.fileno())

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
    history: list[dict] = field(default_factory=list)  # the run's metrics records, earlier processes' included

    def eta_seconds(self) -> float | None:
        if self.iteration_seconds is None or self.state != "running":
            return None
        return (self.total - self.step) * self.iteration_seconds

    def as_dict(self) -> dict:
        return {"state": self.state, "step": self.step, "total": self.total, "reward_mean": self.reward_mean,
                "eval_reward_mean": self.eval_reward_mean, "kl": self.kl, "last_checkpoint": self.last_checkpoint,
                "best_checkpoint": self.best_checkpoint, "eta_seconds": self.eta_seconds(), "message": self.message,
                "error": self.error, "elapsed_seconds": time.time() - self.started_at}
