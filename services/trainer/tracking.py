"""Where a run's numbers go: `metrics.jsonl` and `eval_samples.jsonl` in the run folder (always), and the experiment
trackers `train.tracker` names (services/trainer/trackers.py)."""

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

METRICS_FILE = "metrics.jsonl"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"


class JsonLines:
    """A file of JSON objects, one a line, each with `step`. On resume, lines past the resumed step (written by the
    killed run after its last checkpoint) are dropped, since those steps run again; so is a line that does not parse
    (the torn last line of a process killed mid-write, or garbage), with a warning. A run from scratch (resume_step
    0) starts the file empty. `records` holds every record of the file, earlier processes' included."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.records: list[dict] = []
        if path.exists():
            self.records = [r for r in self._read() if resume_step and r["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

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

    def append(self, records: list[dict]) -> None:
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        self.records.extend(records)

    def sync(self) -> None:
        if self.path.exists():
            with self.path.open("a") as f:
                os.fsync(f.fileno())


class MetricsLog:
    """metrics.jsonl (one record per `write`), eval_samples.jsonl (the samples of each evaluation) and the run's
    trackers (services.trainer.trackers.RunTrackers, or None for the files alone), kept in step. `history` holds
    every metrics record of the run, earlier processes' included; `eval_samples` the newest evaluation's samples."""

    def __init__(self, run_dir: Path, resume_step: int, trackers=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = JsonLines(run_dir / METRICS_FILE, resume_step)
        self._samples = JsonLines(run_dir / EVAL_SAMPLES_FILE, resume_step)
        self.path = self._metrics.path
        self.history = self._metrics.records
        self.trackers = trackers

    @classmethod
    def for_run(cls, config, resume_step: int) -> MetricsLog:
        """The run's files and the trackers its config names, opened (and given the config)."""
        from services.trainer.trackers import RunTrackers

        return cls(config.run_dir, resume_step, RunTrackers.open(config, resume_step))

    @property
    def eval_samples(self) -> list[dict]:
        samples = self._samples.records
        return [s for s in samples if s["step"] == samples[-1]["step"]] if samples else []

    def write(self, step: int, metrics: dict[str, float]) -> dict:
        record = {"step": step, "time": time.time(), **metrics}
        self._metrics.append([record])
        if self.trackers:
            self.trackers.log(metrics, step)
        return record

    def write_samples(self, step: int, samples: list[dict]) -> None:
        """One evaluation's samples: dicts with step, prompt, completion and score."""
        self._samples.append(samples)
        if self.trackers:
            self.trackers.log_samples(samples, step)

    def sync(self) -> None:
        """Make the lines written so far durable: a checkpoint commits only after the records of its steps."""
        self._metrics.sync()
        self._samples.sync()

    def close(self) -> None:
        if self.trackers:
            self.trackers.close()


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
    report: str | None = None  # the end-of-run report's path once written (a finished run's state comes after it)
    report_error: str | None = None  # why the report could not be written
    stop_requested: threading.Event = field(default_factory=threading.Event)
    history: list[dict] = field(default_factory=list)  # the run's metrics records, earlier processes' included
    # The newest evaluation's samples ({step, prompt, completion, score} each), restored from eval_samples.jsonl on
    # resume; replaced (not mutated) at each evaluation, so a reader holding the old list sees a whole one.
    eval_samples: list[dict] = field(default_factory=list)

    def eta_seconds(self) -> float | None:
        if self.iteration_seconds is None or self.state != "running":
            return None
        return (self.total - self.step) * self.iteration_seconds

    def as_dict(self) -> dict:
        return {"state": self.state, "step": self.step, "total": self.total, "reward_mean": self.reward_mean,
                "eval_reward_mean": self.eval_reward_mean, "kl": self.kl, "last_checkpoint": self.last_checkpoint,
                "best_checkpoint": self.best_checkpoint, "eta_seconds": self.eta_seconds(), "message": self.message,
                "error": self.error, "elapsed_seconds": time.time() - self.started_at, "report": self.report,
                "report_error": self.report_error}
