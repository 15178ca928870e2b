"""`train.tracker`: TensorBoard, W&B (offline), MLflow (local SQLite store) and Aim each get the config, every metrics
record at its step and the eval samples, and a resumed run continues the same tracker run. Read back with each
tracker's own reader. Also: eval_samples.jsonl and TrainingStatus.eval_samples, the config's parsing, a missing
package, a tracker that breaks mid-run, W&B's offline decision."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from services.trainer import trackers
from services.trainer.config import TrainConfig, load_config
from services.trainer.run import train
from services.trainer.trackers import INSTALL_HINT, RunTrackers
from services.trainer.tracking import MetricsLog, TrainingStatus
from tests.conftest import ROOT

PROMPTS = ["I watched The", "The story follows a", "This comedy", "We went to see The", "I saw The Quiet",
           "The film The Golden", "In The Silent Mirror,", "My review of"]
EVAL_PROMPTS = PROMPTS[:3]
PROJECT = "tiny-tracking"
ALL = "tensorboard,wandb,mlflow,aim"


def length_reward(samples, prompts, outputs, **kw):
    return [min(len(o), 40) / 40 for o in outputs]


def tiny_config(kit: Path, runs: Path, *overrides: str):
    """The tiny preset cut to seconds: 8 rollouts, one PPO epoch, 8 new tokens; eval and checkpoint every 2."""
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={kit / 'tiny-gpt2'}", f"train.checkpoint_dir={runs}", "train.run_name=tracked",
        "method.num_rollouts=8", "method.chunk_size=8", "train.batch_size=8", "method.ppo_epochs=1",
        "method.gen_kwargs.max_new_tokens=8", "train.total_steps=4", "train.eval_interval=2",
        "train.checkpoint_interval=2", "train.eval_samples_per_prompt=1", "train.torch_threads=1",
        "train.mixed_precision=no", f"train.project_name={PROJECT}", *overrides])


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tracked(tiny_kit, tmp_path_factory):
    """All four trackers, no credentials, no tracking server. The first process dies right after logging step 3
    (its checkpoint is step 2); the second resumes from step 2, reruns step 3 and finishes at step 4."""
    runs = tmp_path_factory.mktemp("runs")
    messages: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = messages.append
    logger = logging.getLogger("services.trainer.trackers")
    logger.addHandler(handler)
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE",
                     "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS"):
            env.delenv(name, raising=False)
        env.setenv("NETRC", str(runs / "absent-netrc"))
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(runs / name.lower()))

        def die_after_step_3(record: dict) -> None:
            if record["step"] == 3:
                raise Killed

        first = tiny_config(tiny_kit, runs, f"train.tracker={ALL}", "train.tags=[first]")
        with pytest.raises(Killed):
            train(first, reward_fn=length_reward, prompts=PROMPTS, eval_prompts=EVAL_PROMPTS,
                  on_step=die_after_step_3)
        ids_after_first = json.loads((first.run_dir / trackers.IDS_FILE).read_text())

        status = TrainingStatus(total=4)
        restored: list[list[dict]] = []

        def note_restored_samples(record: dict) -> None:
            if not restored:
                restored.append(list(status.eval_samples))

        second = tiny_config(tiny_kit, runs, f"train.tracker={ALL}", "train.tags=[first,resumed]")
        train(second, reward_fn=length_reward, prompts=PROMPTS, eval_prompts=EVAL_PROMPTS, status=status,
              on_step=note_restored_samples)
    logger.removeHandler(handler)
    run_dir = second.run_dir
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    return SimpleNamespace(
        run_dir=run_dir, status=status, restored=restored, messages=[m.getMessage() for m in messages],
        ids=json.loads((run_dir / trackers.IDS_FILE).read_text()), ids_after_first=ids_after_first,
        rollouts={m["step"]: m for m in metrics if "rollout/reward_mean" in m},
        evals={m["step"]: m for m in metrics if "eval/reward_mean" in m},
        samples={step: [s for s in samples if s["step"] == step] for step in sorted({s["step"] for s in samples})})


# -- the run folder and the status -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_samples_are_kept_in_the_run_folder_and_the_status(tracked):
    assert tracked.status.state == "finished"
    assert list(tracked.rollouts) == [1, 2, 3, 4] and list(tracked.evals) == [0, 2, 4]
    assert list(tracked.samples) == [0, 2, 4]
    for step, samples in tracked.samples.items():
        assert [s["prompt"] for s in samples] == EVAL_PROMPTS
        assert set(samples[0]) == {"step", "prompt", "completion", "score"}
        assert [s["score"] for s in samples] == pytest.approx(length_reward(None, None, [s["completion"] for s in
                                                                                         samples]))
        # the metric is the mean of exactly these samples' scores (one sample per prompt)
        assert tracked.evals[step]["eval/reward_mean"] == pytest.approx(sum(s["score"] for s in samples) / 3)
    assert tracked.status.eval_samples == tracked.samples[4]
    assert tracked.restored == [tracked.samples[2]]  # loaded back from eval_samples.jsonl on resume
    assert tracked.ids == tracked.ids_after_first and set(tracked.ids) == {"wandb", "mlflow", "aim"}


# -- TensorBoard -------------------------------------------------------------------------------------------------------

def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def text(events, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")}


@pytest.mark.slow
def test_tensorboard_has_every_metric_at_its_step_the_samples_and_the_config(tracked):
    events = tensorboard_events(tracked.run_dir / "tensorboard")
    # step 3 as the resumed process logged it: the killed process's step 3 is purged
    scalars = [(e.step, e.value) for e in events.Scalars("rollout/reward_mean")]
    assert [step for step, _ in scalars] == [1, 2, 3, 4]
    assert dict(scalars) == pytest.approx({s: r["rollout/reward_mean"] for s, r in tracked.rollouts.items()})
    assert {e.step: e.value for e in events.Scalars("objective/kl")} == \
        pytest.approx({s: r["objective/kl"] for s, r in tracked.rollouts.items()})
    assert {e.step: e.value for e in events.Scalars("eval/reward_mean")} == \
        pytest.approx({s: r["eval/reward_mean"] for s, r in tracked.evals.items()})
    tables = text(events, "eval/samples")
    assert sorted(tables) == [0, 2, 4]
    for sample in tracked.samples[4]:
        assert f"{sample['score']:.4f}" in tables[4] and sample["prompt"] in tables[4]
    configs = text(events, "config")
    assert "total_steps: 4" in configs[2] and "run_name: tracked" in configs[0]  # at the start of each process

    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hparams = []
    for folder in sorted(p for p in (tracked.run_dir / "tensorboard").iterdir() if p.is_dir()):
        try:
            content = tensorboard_events(folder).PluginTagToContent("hparams")["_hparams_/session_start_info"]
        except KeyError:  # the folders of accelerate's hparams.yml
            continue
        hparams.append(HParamsPluginData.FromString(content).session_start_info.hparams)
    assert len(hparams) == 2  # one per process
    assert hparams[0]["train.total_steps"].number_value == 4
    assert hparams[0]["train.tracker"].string_value == json.dumps(ALL.split(","))
    assert hparams[1]["train.tags"].string_value == '["first", "resumed"]'


# -- MLflow ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_store_has_the_params_every_metric_and_the_samples_table(tracked, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked.run_dir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])  # the resumed process continued the same run
    assert run.info.run_id == tracked.ids["mlflow"] and run.info.run_name == "tracked"
    params = run.data.params
    assert params["train.total_steps"] == "4" and params["method.num_rollouts"] == "8"
    assert params["train.tags"] == '["first"]'  # MLflow keeps a parameter's first value: said on resume
    assert any("mlflow: train.tags changed on resume" in m for m in tracked.messages)
    assert run.data.tags["tags"] == "first,resumed"  # tags, unlike params, follow the resumed config
    for key, records in (("rollout/reward_mean", tracked.rollouts), ("eval/reward_mean", tracked.evals)):
        history = client.get_metric_history(run.info.run_id, key)
        last = {}
        for point in sorted(history, key=lambda m: m.timestamp):
            last[point.step] = point.value
        assert last == pytest.approx({s: r[key] for s, r in records.items()})
    path = client.download_artifacts(run.info.run_id, "eval_samples.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["step", "prompt", "completion", "score"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    expected = [s for step in (0, 2, 4) for s in tracked.samples[step]]
    assert [{**r, "score": pytest.approx(r["score"])} for r in expected] == rows  # MLflow keeps 10 digits


# -- W&B (offline) -----------------------------------------------------------------------------------------------------

def wandb_records(run_folder: Path) -> list[dict]:
    """The offline run's transaction log, as wandb's own reader prints it."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_folder)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_wandb_runs_offline_and_its_run_has_the_config_metrics_and_samples_table(tracked):
    assert any("no credentials" in m and "offline" in m for m in tracked.messages)
    folders = sorted((tracked.run_dir / "wandb").glob("offline-run-*"))
    assert [f.name.rsplit("-", 1)[1] for f in folders] == [tracked.ids["wandb"]] * 2  # one run, two processes
    logged: dict[int, dict] = {}
    tables = {}
    for folder in folders:
        records = wandb_records(folder)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert (run["project"], run["display_name"], run["run_id"]) == (PROJECT, "tracked", tracked.ids["wandb"])
        config = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
        assert config["train.total_steps"] == 4 and config["model.num_layers_unfrozen"] == -1
        for r in records:
            if r["type"] == "history":
                item, step = r["history"]["item"], int(r["history"]["step"].get("num", 0))
                logged.setdefault(step, {}).update(item)
                if "eval/samples.path" in item:  # a Table: its rows in a file of the run
                    assert item["eval/samples._type"] == "table-file"
                    tables[step] = json.loads((folder / "files" / item["eval/samples.path"]).read_text())
    for key, records in (("rollout/reward_mean", tracked.rollouts), ("eval/reward_mean", tracked.evals)):
        assert {s: v[key] for s, v in logged.items() if key in v} == pytest.approx({s: r[key] for s, r in
                                                                                   records.items()})
    assert sorted(tables) == [0, 2, 4]
    assert tables[4]["columns"] == ["step", "prompt", "completion", "score"]
    assert [dict(zip(tables[4]["columns"], row)) for row in tables[4]["data"]] == tracked.samples[4]


# -- Aim ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_aim_repo_has_one_run_with_hparams_metrics_and_sample_texts(tracked):
    import aim
    from aim.storage.context import Context

    repo_path = tracked.run_dir / "aim"
    # Aim's UI indexes finished runs in the background; a script reading the repo reindexes first
    subprocess.run([str(Path(sys.executable).parent / "aim"), "storage", "--repo", str(repo_path), "reindex", "--yes"],
                   capture_output=True, timeout=120, check=True)
    (run,) = list(aim.Repo(str(repo_path)).iter_runs())
    assert (run.hash, run.name, run.experiment) == (tracked.ids["aim"], "tracked", PROJECT)
    assert run["hparams"]["train.total_steps"] == 4 and sorted(run.tags) == ["first", "resumed"]
    for key, records in (("rollout/reward_mean", tracked.rollouts), ("eval/reward_mean", tracked.evals)):
        steps, (values, *_) = run.get_metric(key, Context({})).data.items_list()  # then epochs, timestamps
        assert dict(zip(steps, values)) == pytest.approx({s: r[key] for s, r in records.items()})
    steps, (texts, *_) = run.get_text_sequence("eval/samples", Context({})).data.items_list()
    assert list(steps) == [0, 2, 4]
    shown = [t.data for t in texts[-1]]
    assert [f"prompt: {s['prompt']}\ncompletion: {s['completion']}\nscore: {s['score']:.4f}"
            for s in tracked.samples[4]] == shown


# -- config, packages, failures (no model) -----------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "names"), [
    ("wandb", ["wandb"]), (["mlflow", "aim"], ["mlflow", "aim"]), ("tensorboard, wandb", ["tensorboard", "wandb"]),
    ("MLflow,mlflow", ["mlflow"]), ("none", []), (None, []), ("", []), ([], [])])
def test_tracker_takes_a_name_a_list_comma_separated_names_or_none(value, names, monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda name: True)
    assert TrainConfig(tracker=value).tracker == names


def test_the_default_is_tensorboard_and_the_older_switch_still_turns_it_off():
    assert TrainConfig().tracker == ["tensorboard"]
    assert TrainConfig(tensorboard=False).tracker == []
    assert TrainConfig(tensorboard=False, tracker="tensorboard,mlflow").tracker == ["mlflow"]
    assert load_config(None, ["train.tensorboard=false"], base={"model": {"model_path": "x"}}).train.tracker == []


def test_an_unknown_tracker_is_refused_with_the_choices():
    choices = "unknown tracker 'comet_ml': choose from tensorboard, wandb, mlflow, aim"
    with pytest.raises(ValidationError, match=choices):
        load_config(None, ["train.tracker=tensorboard,comet_ml"], base={"model": {"model_path": "x"}})


def test_a_tracker_asked_for_but_not_installed_fails_at_load(monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda name: name != "aim")
    hint = r"train.tracker: aim not installed: pip install 'rlhf-services\[tracking\]'"
    with pytest.raises(ValidationError, match=hint):
        load_config(None, ["train.tracker=[tensorboard, aim]"], base={"model": {"model_path": "x"}})
    # a config re-validated elsewhere (the trlX runner's environment) may skip the check
    skipped = TrainConfig.model_validate({"tracker": "aim"}, context={trackers.SKIP_PACKAGE_CHECK: True})
    assert skipped.tracker == ["aim"]


def test_the_default_tensorboard_not_installed_is_a_warning_not_a_failure(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    config = load_config(None, [f"train.checkpoint_dir={tmp_path}"], base={"model": {"model_path": "x"}})
    with caplog.at_level(logging.WARNING, logger="services.trainer.trackers"):
        opened = RunTrackers.open(config, 0)
    assert opened.names == [] and INSTALL_HINT in caplog.text and "tensorboard" in caplog.text
    assert not (config.run_dir / "tensorboard").exists()


def test_tracker_none_opens_nothing_and_metrics_jsonl_is_still_written(tmp_path, caplog):
    config = load_config(None, [f"train.checkpoint_dir={tmp_path}", "train.tracker=none"],
                         base={"model": {"model_path": "x"}})
    with caplog.at_level(logging.WARNING):
        metrics = MetricsLog.for_run(config, 0)
    metrics.write(1, {"rollout/reward_mean": 0.5})
    metrics.close()
    assert metrics.trackers.names == [] and not caplog.records
    assert sorted(p.name for p in config.run_dir.iterdir()) == ["metrics.jsonl", trackers.IDS_FILE]


def test_eval_samples_past_the_resumed_step_are_dropped(tmp_path):
    log = MetricsLog(tmp_path, 0)
    for step in (0, 2, 4):
        log.write_samples(step, [{"step": step, "prompt": p, "completion": "x", "score": 0.5} for p in EVAL_PROMPTS])
    resumed = MetricsLog(tmp_path, 3)  # the checkpoint is step 3: step 4's evaluation runs again
    assert [s["step"] for s in resumed.eval_samples] == [2, 2, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()] == \
        [0, 0, 0, 2, 2, 2]
    assert MetricsLog(tmp_path, 0).eval_samples == []  # a run from scratch


class Recording:
    name = "tensorboard"

    def __init__(self, target=None):
        self.logged: list[tuple[dict, int]] = []

    def start(self):
        self.logged.append(("started", None))

    def store_init_configuration(self, values):
        self.logged.append(("config", values["train.run_name"]))

    def log(self, values, step=None):
        self.logged.append((values, step))

    def finish(self):
        self.logged.append(("finished", None))


class Broken(Recording):
    name = "wandb"

    def log(self, values, step=None):
        raise ConnectionError("the tracking server went away")


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_others_go_on(caplog):
    good, bad = Recording(), Broken()
    group = RunTrackers([bad, good])
    with caplog.at_level(logging.ERROR, logger="services.trainer.trackers"):
        group.log({"rollout/reward_mean": 0.5, "note": "text", "flag": True}, step=1)
        group.log({"rollout/reward_mean": 0.6}, step=2)
    group.close()
    assert good.logged == [({"rollout/reward_mean": 0.5}, 1), ({"rollout/reward_mean": 0.6}, 2), ("finished", None)]
    assert group.trackers == [] and caplog.text.count("the tracking server went away") == 1
    assert "wandb: could not log metrics" in caplog.text


def test_wandb_credentials_come_from_the_environment_or_netrc(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not trackers.wandb_has_credentials()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password 0123456789\n")
    assert trackers.wandb_has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not trackers.wandb_has_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert trackers.wandb_has_credentials()


def test_the_config_is_flattened_as_set_names_it():
    flat = trackers.flatten_config({"train": {"total_steps": 4, "tags": ["a"], "logging_dir": None},
                                    "optimizer": {"kwargs": {"betas": [0.9, 0.95], "lr": 1e-4}}, "empty": {}})
    assert flat == {"train.total_steps": 4, "train.tags": '["a"]', "train.logging_dir": "null",
                    "optimizer.kwargs.betas": "[0.9, 0.95]", "optimizer.kwargs.lr": 1e-4, "empty": "{}"}


def test_a_tracker_that_cannot_start_fails_the_start_and_closes_the_others(monkeypatch, tmp_path):
    class Unreachable(Recording):
        name = "mlflow"

        def start(self):
            raise ConnectionError("no tracking server at http://mlflow:5000")

    started: list[Recording] = []
    monkeypatch.setattr(trackers, "installed", lambda name: True)
    monkeypatch.setitem(trackers.BUILDERS, "tensorboard", lambda target: started.append(Recording()) or started[-1])
    monkeypatch.setitem(trackers.BUILDERS, "mlflow", Unreachable)
    config = load_config(None, [f"train.checkpoint_dir={tmp_path}", "train.tracker=tensorboard,mlflow"],
                         base={"model": {"model_path": "x"}})
    with pytest.raises(RuntimeError, match="train.tracker mlflow: could not start .*no tracking server"):
        RunTrackers.open(config, 0)
    assert started[0].logged == [("started", None), ("finished", None)]


def test_a_tracker_run_that_cannot_be_continued_on_resume_starts_a_new_one(monkeypatch, tmp_path, caplog):
    class Gone(Recording):
        name = "wandb"

        def __init__(self, target):
            super().__init__()
            self.resuming = target.ids.get("wandb")
            self.tracker = SimpleNamespace(id=self.resuming or "new-run")

        def start(self):
            if self.resuming:
                raise ValueError(f"run {self.resuming} not found")

    monkeypatch.setattr(trackers, "installed", lambda name: True)
    monkeypatch.setitem(trackers.BUILDERS, "wandb", Gone)
    config = load_config(None, [f"train.checkpoint_dir={tmp_path}", "train.tracker=wandb"],
                         base={"model": {"model_path": "x"}})
    config.run_dir.mkdir(parents=True)
    (config.run_dir / trackers.IDS_FILE).write_text(json.dumps({"wandb": "deleted-run"}))
    with caplog.at_level(logging.WARNING, logger="services.trainer.trackers"):
        opened = RunTrackers.open(config, 5)
    assert opened.names == ["wandb"] and "wandb: cannot continue run deleted-run" in caplog.text
    assert json.loads((config.run_dir / trackers.IDS_FILE).read_text()) == {"wandb": "new-run"}
    fresh = RunTrackers.open(config, 0)  # a run from scratch never reopens an earlier run
    assert fresh.trackers[0].resuming is None
