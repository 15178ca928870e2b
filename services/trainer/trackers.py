"""Experiment trackers (`train.tracker`): TensorBoard, Weights & Biases, MLflow and Aim, through accelerate's tracker
classes. They get the config (flattened) at the start, every metrics record at its step, and the eval samples as a
table (W&B Table, MLflow table artifact, a TensorBoard text table, Aim Text). metrics.jsonl, always written, stays the
run's record: a tracker that fails mid-run is dropped with an error, the training goes on.

Files go under the run folder (`train.logging_dir` moves them), so every tracker works offline:
  tensorboard  <run>/tensorboard (in a shared logging_dir: <dir>/tensorboard/<run_name>)
  wandb        <run>/wandb; offline without credentials (WANDB_API_KEY or a netrc entry), unless WANDB_MODE is set
  mlflow       a SQLite store, <run>/mlflow/mlflow.db, artifacts in <run>/mlflow/artifacts (MLflow 3 refuses a plain
               file store), unless MLFLOW_TRACKING_URI names another
  aim          an Aim repository, <run>/aim (`aim up --repo <run>/aim`)
A resumed run continues the same tracker run (ids in <run>/trackers.json); TensorBoard hides what a killed process
logged past the checkpoint (`purge_step`). Only the main process opens trackers.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shared.checkpoints import atomic_write_text

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")
INSTALL_HINT = "pip install 'rlhf-services[tracking]'"
SKIP_PACKAGE_CHECK = "skip_tracker_package_check"  # validation context key: a config re-read elsewhere
IDS_FILE = "trackers.json"
SAMPLE_COLUMNS = ("step", "prompt", "completion", "score")


def parse_names(value: Any) -> list[str]:
    """`train.tracker` as written: a name, a list, or comma-separated names; none, null or empty: no tracker."""
    if value is None or value is False:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"train.tracker must be a name, a list of names or comma-separated names, got {value!r}")
    names: list[str] = []
    for item in items:
        name = "" if item is None else str(item).strip().lower()
        if name in ("", "none", "null"):
            continue
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {item!r}: choose from {', '.join(TRACKERS)} (several: a list or "
                             "comma-separated), or none")
        if name not in names:
            names.append(name)
    return names


def installed(name: str) -> bool:
    """Whether accelerate finds the tracker's package; MLflow's SQLite store also needs SQLAlchemy and Alembic."""
    from importlib.util import find_spec

    from accelerate.utils import is_aim_available, is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available,
                 "aim": is_aim_available}[name]()
    if name == "mlflow" and available and not os.environ.get("MLFLOW_TRACKING_URI"):
        return all(find_spec(module) is not None for module in ("sqlalchemy", "alembic"))
    return available


def missing_trackers(names: list[str]) -> list[str]:
    return [name for name in names if not installed(name)]


def flatten_config(values: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """`section.key` -> scalar, as `--set` names them; lists and nulls as JSON text (what every tracker stores)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


@dataclass
class Target:
    """What every tracker is opened with."""

    run_dir: Path
    root: Path  # train.logging_dir, else the run folder
    run_name: str
    project: str
    entity: str | None
    group: str | None
    tags: list[str]
    resume_step: int
    ids: dict[str, str]  # tracker run ids of the run being resumed


def wandb_has_credentials() -> bool:
    """An API key in the environment or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _tensorboard(target: Target):
    from accelerate.tracking import TensorBoardTracker

    shared = target.root != target.run_dir
    name, parent = (target.run_name, target.root / "tensorboard") if shared else ("tensorboard", target.root)
    # Events a killed process wrote past the checkpoint (steps > resume_step) are hidden; a fresh run hides all.
    return TensorBoardTracker(name, str(parent), purge_step=target.resume_step + 1 if target.resume_step else 0)


def _wandb(target: Target):
    from accelerate.tracking import WandBTracker

    kwargs: dict[str, Any] = {"name": target.run_name, "entity": target.entity, "group": target.group,
                              "tags": target.tags or None, "dir": str(target.root)}
    if "wandb" in target.ids:
        kwargs.update(id=target.ids["wandb"], resume="allow")
    if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        kwargs["mode"] = "offline"
        log.warning("W&B: no credentials (WANDB_API_KEY or `wandb login`), so the run is logged offline to %s; "
                    "upload it later with `wandb sync %s/offline-run-*`", target.root / "wandb", target.root / "wandb")
    return WandBTracker(target.project, **kwargs)


def _mlflow(target: Target):
    import mlflow
    from accelerate.tracking import MLflowTracker

    artifacts = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        store = (target.root / "mlflow").resolve()
        store.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
        artifacts = str(store / "artifacts")
    tags = {"group": target.group} if target.group else {}
    if target.tags:
        tags["tags"] = ",".join(target.tags)
    return MLflowTracker(experiment_name=target.project, logging_dir=artifacts, run_id=target.ids.get("mlflow"),
                         tags=tags or None, run_name=target.run_name)


def _aim(target: Target):
    from accelerate.tracking import AimTracker

    kwargs: dict[str, Any] = {"experiment": target.project, "capture_terminal_logs": False}
    if "aim" in target.ids:  # the process that held the run was killed: take it over
        kwargs.update(run_hash=target.ids["aim"], force_resume=True)
    return AimTracker(target.run_name, str(target.root / "aim"), **kwargs)


BUILDERS: dict[str, Callable[[Target], Any]] = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow,
                                                "aim": _aim}


def _run_id(tracker) -> str | None:
    """The id that reopens the tracker's run on resume (TensorBoard needs none: same folder)."""
    return {"wandb": lambda: tracker.tracker.id, "mlflow": lambda: tracker.tracker.info.run_id,
            "aim": lambda: tracker.tracker.hash}.get(tracker.name, lambda: None)()


def _start(name: str, target: Target):
    """Build and start one tracker; one whose stored run cannot be reopened starts a new run instead."""
    try:
        tracker = BUILDERS[name](target)
        if hasattr(tracker, "start"):  # accelerate >= 1.0 starts trackers lazily; older ones in the constructor
            tracker.start()
    except Exception as exc:  # noqa: BLE001 - the run to resume is gone or unreadable: a new one is better than none
        if name not in target.ids:
            raise RuntimeError(f"train.tracker {name}: could not start ({type(exc).__name__}: {exc}); leave it out "
                               "of train.tracker to train without it") from exc
        log.warning("%s: cannot continue run %s (%s); starting a new one", name, target.ids[name], exc)
        target.ids.pop(name)
        return _start(name, target)
    if name == "aim":
        for tag in [t for t in target.tags if t not in tracker.tracker.tags]:
            tracker.tracker.add_tag(tag)
    return tracker


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _tensorboard_samples(tracker, samples: list[dict], step: int) -> None:
    rows = ["| prompt | completion | score |", "|---|---|---|"]
    rows += [f"| {_cell(s['prompt'])} | {_cell(s['completion'])} | {s['score']:.4f} |" for s in samples]
    tracker.log({"eval/samples": "\n".join(rows)}, step=step)  # a text summary: TensorBoard renders the table


def _wandb_samples(tracker, samples: list[dict], step: int) -> None:
    tracker.log_table("eval/samples", columns=list(SAMPLE_COLUMNS), data=[[s[c] for c in SAMPLE_COLUMNS]
                                                                          for s in samples], step=step)


def _mlflow_samples(tracker, samples: list[dict], step: int) -> None:
    import mlflow

    # One table artifact for the run: log_table appends to it, the step column tells evaluations apart.
    mlflow.log_table({c: [s[c] for s in samples] for c in SAMPLE_COLUMNS}, artifact_file="eval_samples.json",
                     run_id=tracker.tracker.info.run_id)


def _aim_samples(tracker, samples: list[dict], step: int) -> None:
    from aim import Text

    texts = [Text(f"prompt: {s['prompt']}\ncompletion: {s['completion']}\nscore: {s['score']:.4f}") for s in samples]
    tracker.log({"eval/samples": texts}, step=step)


SAMPLE_LOGGERS: dict[str, Callable[[Any, list[dict], int], None]] = {
    "tensorboard": _tensorboard_samples, "wandb": _wandb_samples, "mlflow": _mlflow_samples, "aim": _aim_samples}


def _mlflow_new_params(tracker, values: dict) -> dict:
    """MLflow keeps a parameter's first value and refuses another: a resumed run logs only the new keys."""
    from mlflow import MlflowClient

    logged = MlflowClient().get_run(tracker.tracker.info.run_id).data.params
    changed = sorted(k for k, v in values.items() if k in logged and logged[k] != str(v))
    if changed:
        log.warning("mlflow: %s changed on resume; MLflow keeps the first values (the checkpoints' manifests have "
                    "the new ones)", ", ".join(changed))
    return {k: v for k, v in values.items() if k not in logged}


class RunTrackers:
    """The run's open trackers. Every call goes to each of them; one that raises is closed off with an error."""

    def __init__(self, trackers: list, resumed: bool = False):
        self.trackers = list(trackers)
        self.resumed = resumed

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    @classmethod
    def open(cls, config, resume_step: int) -> RunTrackers:
        """The trackers `config.train.tracker` names, started, with the config stored; a missing package is skipped
        with a warning (a tracker asked for explicitly already failed at load: config.TrainConfig)."""
        t = config.train
        missing = missing_trackers(list(t.tracker))
        names = [n for n in t.tracker if n not in missing]
        if missing:
            log.warning("not installed, so not logged to: %s (%s, or set train.tracker: none); metrics.jsonl has "
                        "every metric", ", ".join(missing), INSTALL_HINT)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        target = Target(config.run_dir, t.logging_dir or config.run_dir, t.run_name, t.project_name, t.entity_name,
                        t.group_name, list(t.tags), resume_step, _read_ids(config.run_dir) if resume_step else {})
        trackers = cls([], resumed=bool(resume_step))
        try:
            for name in names:
                trackers.trackers.append(_start(name, target))
        except Exception:
            trackers.close()  # the ones already started: no run left open
            raise
        _write_ids(config.run_dir, trackers.trackers)
        trackers.store_config(config.model_dump(mode="json"), resume_step)
        if names:
            log.info("tracking with %s under %s", ", ".join(names), target.root)
        return trackers

    def store_config(self, config: dict, step: int) -> None:
        values = flatten_config(config)

        def store(tracker) -> None:
            if tracker.name == "mlflow" and self.resumed:
                tracker.store_init_configuration(_mlflow_new_params(tracker, values))
                return
            tracker.store_init_configuration(values)
            if tracker.name == "tensorboard":  # the hparams plugin is a grid; the text tab shows the config whole
                import yaml

                tracker.log({"config": f"```yaml\n{yaml.safe_dump(config, sort_keys=False)}```"}, step=step)

        self._each("store the config", store)

    def log(self, values: dict, step: int) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            self._each("log metrics", lambda tracker: tracker.log(numbers, step=step))

    def log_samples(self, samples: list[dict], step: int) -> None:
        if samples:
            self._each("log the eval samples", lambda tracker: SAMPLE_LOGGERS[tracker.name](tracker, samples, step))

    def close(self) -> None:
        self._each("finish", lambda tracker: tracker.finish())
        self.trackers = []

    def _each(self, action: str, call: Callable[[Any], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker must not end the training; metrics.jsonl has it all
                log.error("%s: could not %s (%s: %s); not logging to it for the rest of this run", tracker.name,
                          action, type(exc).__name__, exc)
                self.trackers.remove(tracker)


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _write_ids(run_dir: Path, trackers: list) -> None:
    """Always written: ids of an earlier run in this folder must not be picked up by a later resume."""
    ids = {t.name: run_id for t in trackers if (run_id := _run_id(t))}
    atomic_write_text(run_dir / IDS_FILE, json.dumps(ids, indent=1))
