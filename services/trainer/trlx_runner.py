"""The trlX side of `train.engine: trlx`: runs in the trlX environment (transformers 4.51, accelerate 0.24), started
by `services.trainer.trlx_engine.run_trlx` as `python -m services.trainer.trlx_runner <spec.json>`.

`trlx.train` runs the job, unmodified, with a registered `AcceleratePPOTrainer` subclass
(`services.trainer.trlx_trainer`) that adds what the project needs at the project's points, and changes nothing of
the algorithm:
  - at the end of each PPO iteration (trlX's `post_epoch_callback`, after `ppo_epochs` passes over the rollouts,
    before the next rollouts are collected; for the last one, when `learn` returns) one metrics.jsonl record with
    the native engine's keys and meanings, computed from what trlX itself computed (its log-probs, values and
    rewards, captured as it made them), plus trlX's own statistics under `trlx/`;
  - the project's evaluation (eval/* keys) before training and after the iterations `evaluates_after` names;
  - checkpoints in the project's layout (safetensors under the tensor names a native checkpoint has, the same
    config and tokenizer files, manifest, best.json, retention) after the iterations `checkpoints_after` names,
    each loaded back with AutoModelForCausalLM and compared with the trained model before it is committed;
  - SIGTERM: the iteration in progress finishes, is saved, and the process exits 0 (state `stopped`).
trlX's own evaluation, checkpoints and trackers are off (`trlx_engine.trlx_config`).

Progress goes to the parent as JSON lines on the file descriptor in RLHF_TRLX_EVENTS_FD; everything else a library
prints goes to stdout/stderr (the parent's runner.log). Imports only what works under transformers 4.51: torch,
trlX, transformers, safetensors and the project's transformers-free modules.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from services.trainer.trlx_engine import EVENTS_FD_ENV

log = logging.getLogger("trlx_runner")


class Stopped(Exception):  # noqa: N818 - control flow: a requested stop, after the save
    """Raised at an iteration boundary after the stop was saved: ends trlX's `learn`."""


class Events:
    """JSON lines to the parent; a parent that went away counts as a stop."""

    def __init__(self, stop: threading.Event):
        fd = os.environ.get(EVENTS_FD_ENV)
        self.stream = os.fdopen(int(fd), "w", buffering=1, encoding="utf-8") if fd else None
        self.stop = stop
        self.lock = threading.Lock()

    def emit(self, **event: Any) -> None:
        if self.stream is None:
            return
        line = json.dumps(event, default=_jsonable) + "\n"
        with self.lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, OSError):
                self.stream = None
                self.stop.set()


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _watch_parent(stop: threading.Event) -> None:
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.warning("the parent process is gone: stopping at the end of this iteration")
            stop.set()


def response_mask(responses, eos_id: int, pad_id: int):
    """1 on response tokens up to and including the first EOS, 0 after it (and on padding); as the native loop."""
    is_eos = (responses == eos_id).long()
    before_or_first_eos = (is_eos.cumsum(-1) - is_eos) == 0
    if pad_id != eos_id:
        before_or_first_eos &= responses != pad_id
    return before_or_first_eos.float()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class Run:
    def __init__(self, spec: dict, stop: threading.Event, events: Events):
        from services.trainer.config import TrainerConfig
        from services.trainer.trackers import SKIP_PACKAGE_CHECK

        self.spec, self.stop, self.events = spec, stop, events
        # re-read in the trlX environment, which has no tracking packages: the parent checked them
        self.config = TrainerConfig.model_validate(spec["config"], context={SKIP_PACKAGE_CHECK: True})
        self.root = Path(spec["checkpoint_root"])
        self.run_dir = self.root / self.config.train.run_name
        self.template = Path(spec["template"])
        self.eos_text = spec["eos_token"] or ""
        self.trainer = None
        self.metrics = None
        self.reward = None
        self.last_scores: list[float] = []
        self.score_seconds = 0.0

    # -- the reward function trlX calls ------------------------------------------------------------------------------

    def reward_fn(self, samples, prompts=None, outputs=None, **kwargs) -> list[float]:
        """The reward service, called exactly as the native engine calls it, on the text without the end-of-text
        marker trlX appends to samples that ended with it."""
        from services.trainer.rewards import checked_scores

        def strip(texts):
            if texts is None or not self.eos_text:
                return texts
            return [t[: -len(self.eos_text)] if t.endswith(self.eos_text) else t for t in texts]

        started = time.perf_counter()
        samples, outputs = strip(samples), strip(outputs)
        scores = checked_scores(self.reward(samples=samples, prompts=prompts, outputs=outputs), len(samples))
        self.score_seconds += time.perf_counter() - started
        self.last_scores.extend(scores)
        return scores

    # -- the job -----------------------------------------------------------------------------------------------------

    def check_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.spec["trlx_config"]["tokenizer"]["tokenizer_path"])
        for item in self.spec["token_check"]:
            ids = tokenizer(item["text"], add_special_tokens=False).input_ids
            if ids != item["ids"]:
                raise RuntimeError(f"the tokenizer copy for transformers 4.51 tokenizes {item['text']!r} as {ids}, "
                                   f"the policy's tokenizer as {item['ids']}: refusing to train on other tokens")

    def train(self) -> str:
        import trlx
        from trlx.data.configs import TRLConfig

        from services.trainer.rewards import remote_reward_fn
        from services.trainer.tracking import MetricsLog
        from services.trainer.trlx_trainer import bind
        from shared.clients import CallInterrupted

        self.check_tokenizer()
        _tolerate_missing_git()
        bind(self)
        config = TRLConfig.from_dict(json.loads(json.dumps(self.spec["trlx_config"])))
        self.reward = remote_reward_fn(self.config.reward, stop=self.stop)
        self.metrics = MetricsLog(self.run_dir, 0)
        self.events.emit(type="state", state="running")
        try:
            trlx.train(reward_fn=self.reward_fn, prompts=self.spec["prompts"], eval_prompts=self.spec["eval_prompts"],
                       config=config)
            # trlX's learn returns right after the last optimizer step: that is the end of the last iteration.
            self.trainer.end_iteration()
            return "finished"
        except Stopped:
            return "stopped"
        except CallInterrupted as exc:  # a stop while waiting for the reward service: the iteration never happened
            log.warning("stopping while the reward service is unavailable (%s)", exc)
            trainer = self.trainer
            if trainer is not None and trainer.iteration > trainer.saved:
                trainer.save_project_checkpoint(trainer.last_stats | trainer.last_eval)
            return "stopped"
        finally:
            self.metrics.close()

    def record(self, step: int, stats: dict) -> dict:
        record = self.metrics.write(step, stats)
        self.events.emit(type="record", record=record)
        return record


def _tolerate_missing_git() -> None:
    """trlX names its tracker run after `git log` in the working directory and catches only git's own failure, not
    a missing git binary (a slim container image): then it gets "unknown", as for a folder that is no repository."""
    import trlx.trainer.accelerate_base_trainer as base_module

    original = base_module.get_git_tag

    def get_git_tag():
        try:
            return original()
        except OSError:
            return "unknown", "unknown"

    base_module.get_git_tag = get_git_tag


def _number(value) -> float | None:
    """A float for numbers and one-element tensors (trlX logs some stats as tensors), else None."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        return None
    if hasattr(value, "detach"):
        if value.numel() != 1:
            return None
        value = value.detach().item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    events = Events(stop)

    def on_signal(signum, frame):
        log.warning("signal %d: saving at the end of this iteration, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=_watch_parent, args=(stop,), name="watch-parent", daemon=True).start()
    events.emit(type="state", state="starting")  # the parent may send SIGTERM from now on
    try:
        spec = json.loads(Path(argv[0]).read_text())
        from shared.runtime import configure_torch

        run = Run(spec, stop, events)
        configure_torch(run.config.train.torch_threads)
        state = run.train()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, with the traceback in the log
        traceback.print_exc()
        events.emit(type="error", error=f"{type(exc).__name__}: {exc}")
        return 1
    events.emit(type="state", state=state)
    log.info("trlX run %s", state)
    return 0


if __name__ == "__main__":
    # Run as the imported module, the one the trainer module imports Stopped from: one class to raise and catch.
    from services.trainer import trlx_runner

    sys.exit(trlx_runner.main())
