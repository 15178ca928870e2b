"""The trlX side of `train.engine: trlx`: runs in the trlX environment (transformers 4.51, accelerate 0.24), started
by `services.trainer.trlx_engine.run_trlx` as `python -m services.trainer.trlx_runner <spec.json>`.

`trlx.train` runs the job, unmodified, with a registered `AcceleratePPOTrainer` subclass that adds what the project
needs at the project's points, and changes nothing of the algorithm:
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
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from services.trainer.trlx_engine import EVENTS_FD_ENV, TRAINER_NAME

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
        from shared.clients import CallInterrupted

        self.check_tokenizer()
        _tolerate_missing_git()
        make_trainer_class(self)
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


def make_trainer_class(run: Run):
    """The AcceleratePPOTrainer subclass (registered as TRAINER_NAME), bound to `run`."""
    from importlib.metadata import version

    import safetensors
    import safetensors.torch
    import torch
    import trlx.trainer.accelerate_ppo_trainer as ppo_module
    from torch.nn.utils.rnn import pad_sequence
    from transformers import AutoModelForCausalLM
    from trlx.trainer import register_trainer
    from trlx.trainer.accelerate_ppo_trainer import AcceleratePPOTrainer
    from trlx.utils.modeling import logprobs_of_labels

    from services.trainer.checkpointing import prune, update_best
    from services.trainer.ppo import explained_variance, masked_mean, sequence_kl
    from shared.checkpoints import write_checkpoint

    trlx_version = version("trlx")
    config = run.config
    steps_per_iteration = config.optimizer_steps_per_iteration

    def entropy(logits):
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    @register_trainer(TRAINER_NAME)
    class ProjectPPOTrainer(AcceleratePPOTrainer):
        def __init__(self, config, **kwargs):
            super().__init__(config, **kwargs)
            run.trainer = self
            self.iteration = 0  # PPO iterations done
            self.saved = 0  # the newest iteration a checkpoint holds
            self.rollout: dict = {}  # stats of the rollouts the current iteration trains on
            self.updates: list[dict] = []  # trlX's stats of each optimizer step of the current iteration
            self.update_started: float | None = None
            self.evaluated_at_start = False
            self.last_stats: dict = {}
            self.last_eval: dict = {}
            self.trlx_rollout_log: dict = {}
            self._log = self.accelerator.log
            self.accelerator.log = self._capture_log  # trlX's own numbers, as it logs them to its trackers
            self._calls: list = []
            self._prompt_widths: list[int] = []
            self._generate_seconds = 0.0
            # The initial policy, frozen: eval/kl is measured against it, as the native engine's reference is it.
            # trlX's hydra reference continues from the trunk's hidden state, and the trunk's position embeddings
            # train in trlX, so that reference drifts from the initial model (trlx/eval/kl_reference measures
            # against it, as trlX's penalty does).
            self.initial = AutoModelForCausalLM.from_pretrained(  # trlX's own copy of the policy, eager attention
                self.config.model.model_path, **self.config.model.model_extra_configs).to(self.accelerator.device)
            self.initial.eval()
            self.initial.requires_grad_(False)

        # -- capturing what trlX computes --------------------------------------------------------------------------

        def _capture_log(self, values: dict, step: int | None = None, **kwargs):
            if "kl_ctl_value" in values:
                self.trlx_rollout_log = dict(values)
            elif "losses/total_loss" in values:
                self.updates.append({k: n for k, v in values.items() if (n := _number(v)) is not None})
            return self._log(values, step=step, **kwargs)

        def generate(self, input_ids, attention_mask=None, **kwargs):
            started = time.perf_counter()
            out = super().generate(input_ids, attention_mask, **kwargs)
            self._generate_seconds += time.perf_counter() - started
            self._prompt_widths.append(input_ids.shape[1])
            return out

        def make_experience(self, num_rollouts: int = 1024, iter_count: int = 0):
            started = time.perf_counter()
            kl_coef = self.kl_ctl.value
            self._calls, self._prompt_widths, self._generate_seconds = [], [], 0.0
            run.last_scores, run.score_seconds = [], 0.0

            def capture(logits, labels):
                out = logprobs_of_labels(logits, labels)
                first = len(self._calls) % 2 == 0  # per chunk: the policy's log-probs, then the reference's
                self._calls.append((out.detach(), labels.detach(), entropy(logits.detach()) if first else None))
                return out

            ppo_module.logprobs_of_labels = capture
            try:
                super().make_experience(num_rollouts, iter_count)
            finally:
                ppo_module.logprobs_of_labels = logprobs_of_labels
            elapsed = time.perf_counter() - started
            self.rollout = self._rollout_stats(kl_coef) | {
                "time/generate": self._generate_seconds, "time/score": run.score_seconds,
                "time/forward": max(0.0, elapsed - self._generate_seconds - run.score_seconds),
                "time/rollout": elapsed}
            self.updates, self.update_started = [], None

        def _rollout_stats(self, kl_coef: float) -> dict:
            eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
            if len(self._calls) != 2 * len(self._prompt_widths):
                raise RuntimeError(f"expected a policy and a reference log-prob pass per chunk, saw "
                                   f"{len(self._calls)} passes for {len(self._prompt_widths)} chunks")
            kls, entropies, lengths, masks = [], [], [], []
            for chunk, width in enumerate(self._prompt_widths):
                (logp, labels, ent), (ref_logp, ref_labels, _) = self._calls[2 * chunk : 2 * chunk + 2]
                if not torch.equal(labels, ref_labels):
                    raise RuntimeError("the policy and reference passes saw different tokens")
                responses = labels[:, width - 1 :]  # the (re-tokenized) responses trlX trains on
                mask = response_mask(responses, eos, pad)
                kls.append(sequence_kl(logp[:, width - 1 :], ref_logp[:, width - 1 :], mask).cpu())
                entropies.append(masked_mean(ent[:, width - 1 :], mask).item())
                lengths.append((mask.sum(1) - (responses == eos).any(1).float()).cpu())
                masks.extend(mask.cpu())
            kl, length = torch.cat(kls), torch.cat(lengths)
            scores = torch.tensor(run.last_scores, dtype=torch.float32)
            elements = self.store.history
            if len(elements) != len(scores) or len(elements) != len(kl):
                raise RuntimeError(f"{len(elements)} rollouts stored, {len(scores)} scored, {len(kl)} measured")
            values = pad_sequence([e.values for e in elements], batch_first=True, padding_value=0.0)
            rewards = pad_sequence([e.rewards for e in elements], batch_first=True, padding_value=0.0)
            width = values.shape[1]
            mask = torch.stack([torch.nn.functional.pad(m, (0, max(0, width - len(m))))[:width] for m in masks])
            _, returns = self.config.method.get_advantages_and_returns(values, rewards, width, use_whitening=False)
            stats = {
                "rollout/reward_mean": scores.mean().item(),
                "rollout/reward_std": scores.std().item() if len(scores) > 1 else 0.0,
                "rollout/response_length": length.mean().item(),
                "rollout/empty_fraction": (length == 0).float().mean().item(),
                "objective/kl": kl.mean().item(),
                "objective/kl_coef": kl_coef,
                "objective/entropy": _mean(entropies),
                "objective/rewards_total": rewards.sum(1).mean().item(),
                "ppo/val/mean": masked_mean(values, mask).item(),
                "ppo/returns/mean": masked_mean(returns, mask).item(),
                "ppo/val/explained_variance": explained_variance(values, returns, mask),
                "ppo/rollouts": len(elements),
            }
            return stats

        def loss(self, batch):
            if self.update_started is None:
                self.update_started = time.perf_counter()
            return super().loss(batch)

        # -- the project's evaluation, iteration ends and checkpoints ----------------------------------------------

        def evaluate(self):
            """trlX calls this before training (then: the project's evaluation at step 0) and at its own eval
            points, which are past the end except its last step (then: nothing; the project evaluates at the
            iteration end)."""
            if self.iter_count == 0 and not self.evaluated_at_start:
                self.evaluated_at_start = True
                self.last_eval = self.project_evaluate()
                run.record(0, self.last_eval)
            return {}

        @torch.no_grad()
        def project_evaluate(self) -> dict:
            """Each eval prompt `eval_samples_per_prompt` times (the spec repeats them), sampled with gen_kwargs:
            reward, KL to the reference (the project's estimator), response length, as the native engine."""
            eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
            scores, kls, ref_kls, lengths = [], [], [], []
            for batch in self.eval_dataloader:
                ids, attention = batch["input_ids"], batch["attention_mask"]
                samples = self.generate_eval(ids, attention)
                width = ids.shape[1]
                str_samples, str_prompts, str_outputs = self.decode(ids, samples)
                scores.extend(run.reward_fn(samples=str_samples, prompts=str_prompts, outputs=str_outputs,
                                            tokenizer=self.tokenizer))
                tokens = samples.to(self.accelerator.device)
                att = tokens.not_equal(pad).long()
                positions = att.cumsum(-1) - 1
                positions.masked_fill_(att == 0, 1)  # as trlX's own passes
                logits = self.model(tokens, attention_mask=att, position_ids=positions, return_dict=True).logits
                ref_logits = self.model.forward_hydra(tokens, attention_mask=att, position_ids=positions,
                                                      return_dict=True).logits
                logp = logprobs_of_labels(logits[:, :-1], tokens[:, 1:])[:, width - 1 :]
                ref_logp = logprobs_of_labels(ref_logits[:, :-1], tokens[:, 1:])[:, width - 1 :]
                init_logits = self.initial(tokens, attention_mask=att, position_ids=positions).logits
                init_logp = logprobs_of_labels(init_logits[:, :-1], tokens[:, 1:])[:, width - 1 :]
                responses = tokens[:, width:]
                mask = response_mask(responses, eos, pad)
                kls.extend(sequence_kl(logp, init_logp, mask).tolist())
                ref_kls.extend(sequence_kl(logp, ref_logp, mask).tolist())
                lengths.extend((mask.sum(1) - (responses == eos).any(1).float()).tolist())
            s = torch.tensor(scores)
            n = torch.tensor(lengths)
            return {"eval/reward_mean": s.mean().item(), "eval/kl": _mean(kls),
                    "trlx/eval/kl_reference": _mean(ref_kls),
                    "eval/response_length": n.mean().item(), "eval/empty_fraction": (n == 0).float().mean().item(),
                    "eval/positive_fraction": (s > 0.5).float().mean().item()}

        def post_epoch_callback(self):
            """trlX: after `ppo_epochs` passes over the rollouts; it then collects the next iteration's."""
            self.end_iteration()
            super().post_epoch_callback()

        def end_iteration(self) -> None:
            self.iteration += 1
            it = self.iteration
            if self.iter_count != it * steps_per_iteration:
                raise RuntimeError(f"trlX made {self.iter_count} optimizer steps by the end of iteration {it}, not "
                                   f"{it * steps_per_iteration}: the iteration mapping does not hold")
            now = time.perf_counter()
            update = now - self.update_started if self.update_started is not None else 0.0
            stats = dict(self.rollout)
            stats.update(self._update_stats())
            stats["time/update"] = update
            stats["time/iteration"] = stats.pop("time/rollout", 0.0) + update
            stats["objective/kl_coef_next"] = self.kl_ctl.value
            stats["ppo/learning_rate"] = self.scheduler.get_last_lr()[0]
            stats["ppo/optimizer_steps"] = self.iter_count
            stats.update({f"trlx/{k}": n for k, v in self.trlx_rollout_log.items() if (n := _number(v)) is not None})
            self.last_stats = stats
            run.record(it, stats)
            if config.evaluates_after(it):
                self.last_eval = self.project_evaluate()
                run.record(it, self.last_eval)
            stopping = run.stop.is_set()
            if config.checkpoints_after(it) or stopping:
                self.save_project_checkpoint(stats | self.last_eval)
            if stopping:
                raise Stopped()

        def _update_stats(self) -> dict:
            """The native update keys from trlX's per-optimizer-step stats, averaged over the iteration; every
            trlX key also under trlx/ (averaged likewise)."""
            if not self.updates:
                return {}
            keys = set().union(*self.updates)
            mean = {k: _mean([u[k] for u in self.updates if k in u]) for k in sorted(keys)}
            native = {"ppo/policy/loss": "losses/policy_loss", "ppo/val/loss": "losses/value_loss",
                      "ppo/loss/total": "losses/total_loss", "ppo/policy/clipfrac": "policy/clipfrac",
                      "ppo/val/clipfrac": "values/clipfrac", "ppo/policy/approx_kl": "policy/approx_kl",
                      "ppo/policy/ratio": "ratio"}
            out = {ours: mean[theirs] for ours, theirs in native.items() if theirs in mean}
            out.update({f"trlx/{k}": v for k, v in mean.items()})
            return out

        def save_project_checkpoint(self, metrics: dict) -> None:
            run.metrics.sync()  # the checkpoint vouches for these lines
            base = self.accelerator.unwrap_model(self.model).base_model
            state = {"engine": "trlx", "iteration": self.iteration, "optimizer_steps": self.iter_count,
                     "kl_coef": self.kl_ctl.value, "trlx_version": trlx_version}

            def save(tmp: Path) -> None:
                write_weights(base, run.template, tmp)
                for item in run.template.iterdir():  # config, generation config, tokenizer: as native writes them
                    if item.is_file() and not item.name.endswith(".safetensors") \
                            and item.name != "model.safetensors.index.json":
                        shutil.copy2(item, tmp / item.name)
                state["probe"] = verify_loads(base, tmp)
                (tmp / "trlx_state.json").write_text(json.dumps(state, indent=1))

            path = write_checkpoint(run.root, run.run_dir.name, self.iteration, save, metrics=metrics,
                                    config=run.spec["config"])
            self.saved = self.iteration
            best = update_best(run.run_dir, path, "eval/reward_mean", metrics.get("eval/reward_mean"))
            prune(run.run_dir, config.train.keep_checkpoints)
            run.events.emit(type="checkpoint", name=f"{run.run_dir.name}/{path.name}", best=best)

        # trlX still saves at its last optimizer step (its checkpoint and eval intervals are past the end):
        # its own layout is not the project's, and accelerate 0.24 + tied weights make it fragile. Nothing to do.
        def save(self, directory=None, **kwargs):
            return None

        def save_pretrained(self, directory=None, **kwargs):
            return None

    def write_weights(base, template: Path, tmp: Path) -> None:
        """The trained weights under exactly the tensor names (and files) of the native checkpoint `template`."""
        index = template / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            shutil.copy2(index, tmp / index.name)
        else:
            with safetensors.safe_open(str(template / "model.safetensors"), framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        trained = base.state_dict()
        missing = sorted(set(weight_map) - set(trained))
        if missing:
            raise RuntimeError(f"the trained model has no tensors {missing[:5]} that the policy's checkpoint has")
        for shard in sorted(set(weight_map.values())):
            tensors = {k: trained[k].detach().cpu().contiguous().clone() for k, f in weight_map.items() if f == shard}
            safetensors.torch.save_file(tensors, str(tmp / shard), metadata={"format": "pt"})

    def verify_loads(base, folder: Path) -> dict:
        """Load `folder` as any user of the checkpoint does and compare its logits with the trained model's;
        returns the probe and a slice of the trained model's logits on it (trlx_state.json keeps them, so that the
        checkpoint can be checked again elsewhere, e.g. under transformers 5)."""
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
        vocab = base.config.vocab_size
        probe = torch.arange(1, 17).remainder(vocab).unsqueeze(0).repeat(2, 1)
        probe[1] = probe[1].flip(0)
        was_training = base.training
        base.eval()
        with torch.no_grad():
            expected = base(input_ids=probe.to(base.device)).logits.float().cpu()
            got = loaded(input_ids=probe).logits.float()
        base.train(was_training)
        diff = (expected - got).abs().max().item()
        if not diff <= 1e-5:
            raise RuntimeError(f"the checkpoint written to {folder} does not reproduce the trained model (logits "
                               f"differ by {diff:.3g}); not committing it")
        return {"input_ids": probe.tolist(), "logits_first8": expected[..., :8].tolist(),
                "max_abs_diff_on_reload": diff}

    return ProjectPPOTrainer


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
    sys.exit(main())
