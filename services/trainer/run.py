"""`train(config, reward_fn=None, prompts=None, eval_prompts=None)`: one PPO job from start (or resume) to end."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import gather_object

from services.trainer import precision
from services.trainer.checkpointing import (
    load_trainer_state,
    prune,
    resume_candidates,
    save_checkpoint,
    set_aside,
    update_best,
)
from services.trainer.config import TrainerConfig
from services.trainer.data import PromptSampler, load_texts, make_prompts
from services.trainer.loop import PPOTrainer
from services.trainer.policy import (
    PolicyWithValueHead,
    freeze_trunk,
    load_policy,
    load_policy_and_tokenizer,
    make_reference,
)
from services.trainer.preflight import RunFinished, RunRefused, check_run
from services.trainer.report import EVAL_PROMPTS, MIXED_PRECISION_KEY, write_report
from services.trainer.rewards import RewardFn, remote_reward_fn, wait_for_reward_service
from services.trainer.tracking import MetricsLog, TrainingStatus
from shared.checkpoints import atomic_write_text, recover_checkpoints
from shared.clients import CallInterrupted
from shared.runtime import configure_torch

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_prompts(config: TrainerConfig, prompts=None, eval_prompts=None) -> tuple[list[str], list[str]]:
    """The training and eval prompts: those given (as trlx.train takes them), else made from `config.data`."""
    d = config.data
    if prompts is None or eval_prompts is None:
        train_texts, eval_texts = load_texts(d.source, d.text_column, d.split, d.eval_split)
        if prompts is None:
            prompts = make_prompts(train_texts, d.prompt_words, config.train.seed, d.max_prompts)
        if eval_prompts is None:
            eval_prompts = make_prompts(eval_texts, d.prompt_words, config.train.seed + 1, d.eval_prompts)
    return list(prompts), list(eval_prompts)


def prepare_run_folder(config: TrainerConfig, eval_prompts: list[str]) -> None:
    """The run folder as either engine starts it: no leftovers of a process that died while saving, the old run
    moved aside when this one starts over (train.resume off), and the eval prompts (the end-of-run report continues
    them with the base and the trained policy)."""
    for action in recover_checkpoints(config.run_dir):
        log.warning("cleaning up after a process that died while saving: %s", action)
    if not config.train.resume:
        set_aside(config.run_dir)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.run_dir / EVAL_PROMPTS, json.dumps(eval_prompts, indent=1))


def await_reward_service(config: TrainerConfig, status: TrainingStatus) -> bool:
    """Wait for the reward service, saying so in the status; False when a stop came first."""
    status.state = "waiting_for_reward"
    try:
        wait_for_reward_service(config.reward.url, config.reward.wait_ready_s,
                                on_wait=lambda message: setattr(status, "message", message),
                                api_key=config.reward.api_key, stop=status.stop_requested)
    except CallInterrupted:
        status.state = "stopped"  # nothing trained yet, nothing to save
        return False
    status.message = None
    return True


def train(config: TrainerConfig, reward_fn: RewardFn | None = None, prompts: Sequence[str] | None = None,
          eval_prompts: Sequence[str] | None = None, status: TrainingStatus | None = None,
          on_step: Callable[[dict], None] | None = None) -> TrainingStatus:
    """Run the job in `config`; returns its final status. `reward_fn` follows trlX: (samples, prompts, outputs,
    **kw) -> scores; when None, the reward service named in `config.reward` is used (and waited for)."""
    status = status or TrainingStatus(total=config.train.total_steps)
    try:
        if not _already_finished(config, status):
            _train(config, reward_fn, prompts, eval_prompts, status, on_step)
    except Exception as exc:
        # A refusal's message is the whole story (what is wrong and what to do); other errors need their type.
        status.state, status.error = "failed", str(exc) if isinstance(exc, RunRefused) else \
            f"{type(exc).__name__}: {exc}"
        log.error("training failed: %s", status.error)
        raise
    return status


def _already_finished(config: TrainerConfig, status: TrainingStatus) -> bool:
    """Check the run before anything loads (either engine): True, said in the log and the status, when it already
    reached total_steps; a ResumeConflict propagates (the job fails rather than resume silently)."""
    try:
        check_run(config)
    except RunFinished as done:
        log.warning("%s", done)
        status.state, status.message = "finished", str(done)
        status.step = status.start_step = done.step or 0
        status.last_checkpoint, status.best_checkpoint = done.checkpoint, done.best
        report = config.run_dir / "report.md"
        status.report = str(report) if report.exists() else None
        return True
    return False


def _train(config, reward_fn, prompts, eval_prompts, status: TrainingStatus, on_step) -> None:
    t = config.train
    if config.translation:
        config.translation.log(log)
    if t.engine == "trlx":
        from services.trainer.trlx_engine import check_trlx_config, run_trlx

        check_trlx_config(config, reward_fn)
        run_trlx(config, prompts, eval_prompts, status, on_step)
        if status.state == "finished" and config.generator.url:
            report_run(config, status)
        return
    configure_torch(t.torch_threads)
    mixed = precision.resolve(t.mixed_precision)
    log.info(precision.describe(t.mixed_precision, mixed))
    accelerator = precision.make_accelerator(mixed)
    main = accelerator.is_main_process
    _seed_everything(t.seed + accelerator.process_index)  # before the value head is built: reproducible runs

    base, tokenizer = load_policy_and_tokenizer(config.model.model_path, config.model.revision,
                                                config.tokenizer.tokenizer_path)
    tokenizer.truncation_side = config.tokenizer.truncation_side
    reference = make_reference(base, config.model.num_layers_unfrozen)  # the original weights, also when resuming

    train_prompts, eval_set = run_prompts(config, prompts, eval_prompts)
    if main:
        prepare_run_folder(config, eval_set)
    accelerator.wait_for_everyone()
    if reward_fn is None:
        if not await_reward_service(config, status):
            return
        reward_fn = remote_reward_fn(config.reward, stop=status.stop_requested)

    def build(model) -> PPOTrainer:  # a fresh sampler each time: a failed resume must leave nothing behind
        sampler = PromptSampler(train_prompts, t.seed + accelerator.process_index)
        freeze_trunk(model, config.model.num_layers_unfrozen)
        policy = PolicyWithValueHead(model, config.model.value_head_hidden)
        return PPOTrainer(config, policy, reference, tokenizer, reward_fn, sampler, eval_set, accelerator)

    trainer = _resume(config, status, accelerator, build) if t.resume else None
    if trainer is None:
        trainer = build(base)
    status.step = status.start_step = trainer.iteration
    metrics = MetricsLog.for_run(config, trainer.iteration) if main else None
    if metrics:
        status.history = metrics.history
        status.eval_samples = metrics.eval_samples  # the newest evaluation before the resumed step
    progress = _progress(main, status)
    try:
        if _run_steps(trainer, config, status, accelerator, metrics, on_step, progress):
            if main and config.generator.url:
                report_run(config, status)
            status.state = "finished"  # after the report: whoever waits for "finished" finds it written
        else:
            status.state = "stopped"
    finally:
        if progress:
            progress.close()
        if metrics:
            metrics.close()


def _run_steps(trainer: PPOTrainer, config: TrainerConfig, status: TrainingStatus, accelerator,
               metrics: MetricsLog | None, on_step, progress) -> bool:
    """PPO iterations up to `total_steps`: True when all are done, False when a stop came first (after saving every
    step done, also when the stop comes while the reward service is down)."""
    t = config.train
    last_eval: dict = {}
    stats: dict = {}
    saved = trainer.iteration  # the newest step a checkpoint holds
    try:
        if trainer.iteration == 0:
            last_eval = _evaluate(trainer, metrics, status, accelerator)
        status.state = "running"
        while trainer.iteration < t.total_steps:
            started = time.perf_counter()
            point = trainer.resume_point()
            try:
                stats = trainer.step()
            except CallInterrupted:  # stopped while scoring: this iteration never happened
                trainer.rewind(point)
                raise
            it = trainer.iteration
            last_eval = {}  # a checkpoint records only its own step's evaluation: best.json must not credit an old one
            status.step, status.reward_mean, status.kl = it, stats["rollout/reward_mean"], stats["objective/kl"]
            if metrics:
                record = metrics.write(it, stats)
                if on_step:
                    on_step(record)
            if config.evaluates_after(it):
                last_eval = _evaluate(trainer, metrics, status, accelerator)
            stopping = status.stop_requested.is_set()
            if config.checkpoints_after(it) or stopping:
                _save(trainer, config, status, accelerator, metrics, stats | last_eval)
                saved = it
            elapsed = time.perf_counter() - started
            status.iteration_seconds = elapsed if status.iteration_seconds is None else \
                0.8 * status.iteration_seconds + 0.2 * elapsed
            if progress:
                progress.update(1)
                progress.set_postfix(reward=f"{stats['rollout/reward_mean']:.3f}", kl=f"{stats['objective/kl']:.2f}")
            if stopping:
                return False
        return True
    except CallInterrupted as exc:
        log.warning("stopping while the reward service is unavailable (%s)", exc)
    if trainer.iteration > saved:
        _save(trainer, config, status, accelerator, metrics, stats | last_eval)
    return False


def _save(trainer: PPOTrainer, config: TrainerConfig, status: TrainingStatus, accelerator,
          metrics: MetricsLog | None, values: dict) -> None:
    if metrics:
        metrics.sync()  # the checkpoint vouches for these lines: they must outlive a power cut too
    _checkpoint(trainer, config, status, accelerator, values)


def _resume(config: TrainerConfig, status: TrainingStatus, accelerator, build) -> PPOTrainer | None:
    """A trainer at the newest checkpoint that loads completely (weights and trainer state). A newer one that does
    not (corrupt, tampered, refused by the weights-only loader) is skipped with a warning and a status message; None
    when there is no usable checkpoint, which is said too when some were skipped."""
    skipped: list[str] = []
    for info in resume_candidates(config.run_dir):
        try:
            if not info.valid:
                raise ValueError(info.error)
            state = load_trainer_state(info.path)
            trainer = build(load_policy(str(info.path)))
            ranks = state["ranks"]  # a job resumed with fewer or more processes reuses the nearest rank's state
            trainer.load_state_dict(ranks[min(accelerator.process_index, len(ranks) - 1)] | state["shared"])
        except Exception as exc:  # noqa: BLE001 - any failure to load means: try the previous checkpoint
            accelerator.free_memory()  # drop what a half-built trainer prepared; nothing else is prepared yet
            skipped.append(f"{info.name} is unusable ({exc})")
            log.warning("not resuming from %s: %s", info.name, exc)
            continue
        log.info("resumed from %s at step %d", info.path, trainer.iteration)
        status.last_checkpoint = info.name
        if skipped:
            status.message = f"resumed from {info.name} instead: {'; '.join(skipped)}"
            log.warning(status.message)
        return trainer
    if skipped:
        status.message = f"starting from scratch, no checkpoint could be loaded: {'; '.join(skipped)}"
        log.error(status.message)
    return None


def report_run(config: TrainerConfig, status: TrainingStatus) -> None:
    """The end-of-run report, through the generator and reward services, its path (or why it failed) in `status`; a
    failure here costs no training."""
    from shared.clients import GeneratorClient, RetryPolicy, RewardClient

    retry = RetryPolicy(max_retries=3)
    try:
        with RewardClient(config.reward.url, model=config.reward.model, label=config.reward.label,
                          api_key=config.reward.api_key, retry=retry) as reward, \
                GeneratorClient(config.generator.url, api_key=config.generator.api_key, retry=retry) as generator:
            path = write_report(config.run_dir, reward, generator)
        log.info("report written to %s", path)
        status.report = str(path)
    except Exception as exc:  # noqa: BLE001
        status.report_error = f"{type(exc).__name__}: {exc}"
        log.error("could not write the report: %s", status.report_error)


def _progress(main: bool, status: TrainingStatus):
    if not main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=status.total, initial=status.step, desc="PPO", unit="it", dynamic_ncols=True)


def _evaluate(trainer: PPOTrainer, metrics: MetricsLog | None, status: TrainingStatus, accelerator) -> dict:
    result: dict = {}
    if accelerator.is_main_process:
        result = trainer.evaluate()
        status.eval_reward_mean, status.eval_samples = result["eval/reward_mean"], trainer.eval_samples
        if metrics:
            metrics.write(trainer.iteration, result)
            metrics.write_samples(trainer.iteration, trainer.eval_samples)
    accelerator.wait_for_everyone()
    return result


def _checkpoint(trainer: PPOTrainer, config: TrainerConfig, status: TrainingStatus, accelerator,
                metrics: dict) -> None:
    """Every process contributes its RNG and data position; the main process writes the checkpoint."""
    state = trainer.state_dict()
    per_rank = {"rng": state.pop("rng"), "sampler": state.pop("sampler")}
    ranks = gather_object([per_rank])
    if accelerator.is_main_process:
        metrics = metrics | {MIXED_PRECISION_KEY: trainer.precision}  # what `auto` became, on the machine it ran on
        path = save_checkpoint(config.run_dir, trainer.iteration, trainer.policy, trainer.tokenizer,
                               {"shared": state, "ranks": ranks}, metrics, config.model_dump(mode="json"))
        status.last_checkpoint = f"{config.run_dir.name}/{path.name}"
        status.best_checkpoint = update_best(config.run_dir, path, "eval/reward_mean",
                                             metrics.get("eval/reward_mean"))
        prune(config.run_dir, config.train.keep_checkpoints)
    accelerator.wait_for_everyone()
