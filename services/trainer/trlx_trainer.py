"""The trainer trlX runs for `train.engine: trlx`: an `AcceleratePPOTrainer` subclass that adds the project's metrics,
evaluation, checkpoints and stop at the project's points, and changes nothing of the algorithm (what it does, and
when: `services.trainer.trlx_runner`).

Imports trlX at the top, so only the runner imports it, in the trlX environment (transformers 4.51, accelerate
0.24), once the run starts. `bind(run)` registers the class with trlX under TRAINER_NAME, bound to the runner's
`Run`, whose reward function, metrics log, events and stop it reports to.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

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
from services.trainer.trlx_engine import TRAINER_NAME
from services.trainer.trlx_runner import Stopped, _mean, _number, response_mask
from shared.checkpoints import write_checkpoint

if TYPE_CHECKING:
    from services.trainer.trlx_runner import Run

TRLX_VERSION = version("trlx")
# trlX's per-optimizer-step statistics under the native engine's update keys
NATIVE_UPDATE_KEYS = {"ppo/policy/loss": "losses/policy_loss", "ppo/val/loss": "losses/value_loss",
                      "ppo/loss/total": "losses/total_loss", "ppo/policy/clipfrac": "policy/clipfrac",
                      "ppo/val/clipfrac": "values/clipfrac", "ppo/policy/approx_kl": "policy/approx_kl",
                      "ppo/policy/ratio": "ratio"}


def bind(run: Run) -> type[ProjectPPOTrainer]:
    """Register, as TRAINER_NAME, the trainer class that reports to `run` (trlX builds its trainer from the name)."""
    bound = type(ProjectPPOTrainer.__name__, (ProjectPPOTrainer,), {"run": run})
    return register_trainer(TRAINER_NAME)(bound)


def entropy(logits):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ProjectPPOTrainer(AcceleratePPOTrainer):
    run: Run  # set by `bind`

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.run.trainer = self
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

    # -- capturing what trlX computes ----------------------------------------------------------------------------------

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
        run = self.run
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
        kl, entropies, length, masks = self._response_stats()
        scores = torch.tensor(self.run.last_scores, dtype=torch.float32)
        elements = self.store.history
        if len(elements) != len(scores) or len(elements) != len(kl):
            raise RuntimeError(f"{len(elements)} rollouts stored, {len(scores)} scored, {len(kl)} measured")
        values = pad_sequence([e.values for e in elements], batch_first=True, padding_value=0.0)
        rewards = pad_sequence([e.rewards for e in elements], batch_first=True, padding_value=0.0)
        width = values.shape[1]
        mask = torch.stack([torch.nn.functional.pad(m, (0, max(0, width - len(m))))[:width] for m in masks])
        _, returns = self.config.method.get_advantages_and_returns(values, rewards, width, use_whitening=False)
        return {
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

    def _response_stats(self) -> tuple:
        """Per rollout, from the log-prob passes captured in make_experience: KL to the reference and response
        length (tensors), the response masks; per chunk: the mean entropy."""
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
        return torch.cat(kls), entropies, torch.cat(lengths), masks

    def loss(self, batch):
        if self.update_started is None:
            self.update_started = time.perf_counter()
        return super().loss(batch)

    # -- the project's evaluation --------------------------------------------------------------------------------------

    def evaluate(self):
        """trlX calls this before training (then: the project's evaluation at step 0) and at its own eval points,
        which are past the end except its last step (then: nothing; the project evaluates at the iteration end)."""
        if self.iter_count == 0 and not self.evaluated_at_start:
            self.evaluated_at_start = True
            self.last_eval = self.project_evaluate()
            self.run.record(0, self.last_eval)
        return {}

    @torch.no_grad()
    def project_evaluate(self) -> dict:
        """Each eval prompt `eval_samples_per_prompt` times (the spec repeats them), sampled with gen_kwargs: reward,
        KL to the reference (the project's estimator), response length, as the native engine."""
        scores, kls, ref_kls, lengths = [], [], [], []
        for batch in self.eval_dataloader:
            ids = batch["input_ids"]
            samples = self.generate_eval(ids, batch["attention_mask"])
            str_samples, str_prompts, str_outputs = self.decode(ids, samples)
            scores.extend(self.run.reward_fn(samples=str_samples, prompts=str_prompts, outputs=str_outputs,
                                             tokenizer=self.tokenizer))
            kl, ref_kl, length = self._sample_stats(samples.to(self.accelerator.device), ids.shape[1])
            kls.extend(kl)
            ref_kls.extend(ref_kl)
            lengths.extend(length)
        s = torch.tensor(scores)
        n = torch.tensor(lengths)
        return {"eval/reward_mean": s.mean().item(), "eval/kl": _mean(kls),
                "trlx/eval/kl_reference": _mean(ref_kls),
                "eval/response_length": n.mean().item(), "eval/empty_fraction": (n == 0).float().mean().item(),
                "eval/positive_fraction": (s > 0.5).float().mean().item()}

    def _sample_stats(self, tokens, width: int) -> tuple[list, list, list]:
        """Per sample (prompt of `width` tokens, then response): KL to the initial policy, KL to trlX's hydra
        reference, response length."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        att = tokens.not_equal(pad).long()
        positions = att.cumsum(-1) - 1
        positions.masked_fill_(att == 0, 1)  # as trlX's own passes
        logits = self.model(tokens, attention_mask=att, position_ids=positions, return_dict=True).logits
        ref_logits = self.model.forward_hydra(tokens, attention_mask=att, position_ids=positions,
                                              return_dict=True).logits
        init_logits = self.initial(tokens, attention_mask=att, position_ids=positions).logits
        logp, ref_logp, init_logp = (logprobs_of_labels(x[:, :-1], tokens[:, 1:])[:, width - 1 :]
                                     for x in (logits, ref_logits, init_logits))
        responses = tokens[:, width:]
        mask = response_mask(responses, eos, pad)
        return (sequence_kl(logp, init_logp, mask).tolist(), sequence_kl(logp, ref_logp, mask).tolist(),
                (mask.sum(1) - (responses == eos).any(1).float()).tolist())

    # -- iteration ends and checkpoints --------------------------------------------------------------------------------

    def post_epoch_callback(self):
        """trlX: after `ppo_epochs` passes over the rollouts; it then collects the next iteration's."""
        self.end_iteration()
        super().post_epoch_callback()

    def end_iteration(self) -> None:
        run, config = self.run, self.run.config
        self.iteration += 1
        it = self.iteration
        if self.iter_count != it * config.optimizer_steps_per_iteration:
            raise RuntimeError(f"trlX made {self.iter_count} optimizer steps by the end of iteration {it}, not "
                               f"{it * config.optimizer_steps_per_iteration}: the iteration mapping does not hold")
        self.last_stats = stats = self._iteration_stats()
        run.record(it, stats)
        if config.evaluates_after(it):
            self.last_eval = self.project_evaluate()
            run.record(it, self.last_eval)
        stopping = run.stop.is_set()
        if config.checkpoints_after(it) or stopping:
            self.save_project_checkpoint(stats | self.last_eval)
        if stopping:
            raise Stopped()

    def _iteration_stats(self) -> dict:
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
        return stats

    def _update_stats(self) -> dict:
        """The native update keys from trlX's per-optimizer-step stats, averaged over the iteration; every trlX key
        also under trlx/ (averaged likewise)."""
        if not self.updates:
            return {}
        keys = set().union(*self.updates)
        mean = {k: _mean([u[k] for u in self.updates if k in u]) for k in sorted(keys)}
        out = {ours: mean[theirs] for ours, theirs in NATIVE_UPDATE_KEYS.items() if theirs in mean}
        out.update({f"trlx/{k}": v for k, v in mean.items()})
        return out

    def save_project_checkpoint(self, metrics: dict) -> None:
        run = self.run
        run.metrics.sync()  # the checkpoint vouches for these lines
        base = self.accelerator.unwrap_model(self.model).base_model
        state = {"engine": "trlx", "iteration": self.iteration, "optimizer_steps": self.iter_count,
                 "kl_coef": self.kl_ctl.value, "trlx_version": TRLX_VERSION}

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
        prune(run.run_dir, run.config.train.keep_checkpoints)
        run.events.emit(type="checkpoint", name=f"{run.run_dir.name}/{path.name}", best=best)

    # trlX still saves at its last optimizer step (its checkpoint and eval intervals are past the end): its own
    # layout is not the project's, and accelerate 0.24 + tied weights make it fragile. Nothing to do.
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
    """Load `folder` as any user of the checkpoint does and compare its logits with the trained model's; returns the
    probe and a slice of the trained model's logits on it (trlx_state.json keeps them, so that the checkpoint can be
    checked again elsewhere, e.g. under transformers 5)."""
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
