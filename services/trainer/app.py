"""The trainer's HTTP face: the job runs in a background thread; this reports on it and can stop it, and serves
the live page (services/trainer/page.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from prometheus_client import Gauge

from services.trainer.config import DEFAULT_STOP_GRACE_S, TrainerConfig
from services.trainer.page import add_page_routes
from services.trainer.run import train
from services.trainer.tracking import TrainingStatus
from shared.server import add_operational_routes, bearer_guard, create_service_app

log = logging.getLogger(__name__)


def create_app(config: TrainerConfig, api_key: str | None = None, reward_fn=None,
               stop_grace_s: float = DEFAULT_STOP_GRACE_S) -> FastAPI:
    """`stop_grace_s`: how long a shutdown waits for the job to finish its iteration and save (as `rlhf up` does)."""
    status = TrainingStatus(total=config.train.total_steps)
    done = threading.Event()
    lifespan = _job_lifespan(config, reward_fn, status, done, stop_grace_s)
    app = create_service_app(title="Trainer service", namespace="trainer", max_body_bytes=1024 * 1024,
                             lifespan=lifespan)
    _add_gauges(app, status)
    app.state.status, app.state.done = status, done
    ready = {"starting": "the job is starting", "waiting_for_reward": "waiting for the reward service",
             "failed": "the job failed"}
    add_operational_routes(app, app.state.registry, lambda: ready.get(status.state))
    guard = [Depends(bearer_guard(lambda: api_key))]
    add_page_routes(app, status, config, guard)
    _add_job_routes(app, status, guard)
    return app


def _job_lifespan(config: TrainerConfig, reward_fn, status: TrainingStatus, done: threading.Event,
                  stop_grace_s: float):
    """The job runs in a thread for the app's lifetime; a shutdown stops it and waits for its save."""

    def run() -> None:
        try:
            train(config, reward_fn=reward_fn, status=status)
        except Exception:  # noqa: BLE001 - recorded in status (state failed, error) and logged by train()
            pass
        finally:
            done.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=run, name="ppo", daemon=True)
        thread.start()
        yield
        status.stop_requested.set()  # a shutdown saves a checkpoint, as POST /v1/stop does
        await asyncio.to_thread(thread.join, stop_grace_s)
        if thread.is_alive():
            log.error("the job did not save within %g s of the shutdown; the next start resumes from the last "
                      "checkpoint", stop_grace_s)

    return lifespan


def _add_gauges(app: FastAPI, status: TrainingStatus) -> None:
    """Step, reward and KL on /metrics, read from `status` at each scrape."""
    step_gauge = Gauge("trainer_step", "PPO iterations done", registry=app.state.registry)
    reward_gauge = Gauge("trainer_reward_mean", "Mean rollout reward of the last iteration",
                         registry=app.state.registry)
    kl_gauge = Gauge("trainer_kl", "KL to the reference of the last iteration", registry=app.state.registry)

    def refresh() -> None:
        step_gauge.set(status.step)
        if status.reward_mean is not None:
            reward_gauge.set(status.reward_mean)
        if status.kl is not None:
            kl_gauge.set(status.kl)

    app.state.before_scrape.append(refresh)


def _add_job_routes(app: FastAPI, status: TrainingStatus, guard: list) -> None:
    @app.get("/v1/status", dependencies=guard)
    async def get_status() -> dict:
        """State, step, total, reward mean, KL, last and best checkpoint, ETA."""
        return status.as_dict()

    @app.get("/v1/metrics", dependencies=guard)
    async def get_metrics(since: int = 0) -> dict:
        """The run's metrics (the lines of metrics.jsonl: rollouts and evals, from before a resume too) from step
        `since` on."""
        return {"history": [h for h in list(status.history) if h["step"] >= since]}

    @app.post("/v1/stop", dependencies=guard)
    async def stop() -> dict:
        """Stop after the current iteration, saving a checkpoint first."""
        if status.state in ("finished", "stopped", "failed"):
            return status.as_dict()
        status.stop_requested.set()
        status.state = "stopping"
        return status.as_dict()
