"""The PPO loop: `PPOTrainer.step()` reads like the algorithm (OpenAI lm-human-preferences; trlX).

generate -> score -> policy and reference log-probs -> KL-penalised rewards -> advantages -> epochs of minibatch
updates -> stats -> KL controller update. Generation happens in-process on the policy being trained; the reward
comes from `reward_fn` (the reward service in production, a fake in tests).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from services.trainer import precision
from services.trainer.config import TrainerConfig
from services.trainer.data import PromptSampler
from services.trainer.policy import (
    PolicyWithValueHead,
    float32_output_head,
    response_keep,
    response_logprobs,
    response_logprobs_and_entropy,
    response_mask,
    response_values,
)
from services.trainer.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_mean,
    ppo_losses,
    sequence_kl,
)
from services.trainer.rewards import RewardFn, checked_scores


@dataclass
class Rollouts:
    """A batch of sampled responses and everything PPO needs about them; tensors are (B, Q) or (B, R)."""

    prompts: list[str]
    outputs: list[str]
    queries: torch.Tensor  # (B, Q) left-padded
    query_mask: torch.Tensor  # (B, Q)
    responses: torch.Tensor  # (B, R) right-padded with EOS
    mask: torch.Tensor  # (B, R) real response tokens, up to and including the first EOS
    scores: torch.Tensor | None = None  # (B,) as the reward function gave them
    logprobs: torch.Tensor | None = None  # (B, R) under the policy that sampled them
    ref_logprobs: torch.Tensor | None = None  # (B, R) under the reference
    values: torch.Tensor | None = None  # (B, R)
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.queries, self.responses], dim=1)  # (B, Q + R)

    def response_lengths(self, eos: int) -> torch.Tensor:
        """Tokens per response, the EOS not counted, (B,)."""
        return self.mask.sum(1) - (self.responses == eos).any(1).float()

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.mask.long()], dim=1)  # (B, Q + R)


def _pad_cat(tensors: list[torch.Tensor], value: int | float, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        padded.append(torch.cat([pad, t] if left else [t, pad], dim=1))
    return torch.cat(padded)


def make_kl_controller(config: TrainerConfig):
    m = config.method
    if m.target is None:
        return FixedKLController(m.init_kl_coef)
    return AdaptiveKLController(m.init_kl_coef, m.target, m.horizon)


class PPOTrainer:
    def __init__(self, config: TrainerConfig, policy: PolicyWithValueHead, reference, tokenizer, reward_fn: RewardFn,
                 sampler: PromptSampler, eval_prompts: list[str], accelerator: Accelerator | None = None):
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        self.sampler, self.eval_prompts = sampler, eval_prompts
        self.precision = precision.resolve(config.train.mixed_precision)
        self.accelerator = accelerator or precision.make_accelerator(self.precision)
        if self.accelerator.mixed_precision != self.precision:
            raise ValueError(f"the accelerator runs mixed precision {self.accelerator.mixed_precision}, the config "
                             f"{self.precision}: build it with precision.make_accelerator")
        if self.precision != "no":  # the logits that log-probs come from stay float32
            for model in (policy.base, reference.model):
                float32_output_head(model)
        optimizer = config.optimizer.build([p for p in policy.parameters() if p.requires_grad])  # unfrozen ones
        scheduler = config.scheduler.build(optimizer, config.total_optimizer_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(policy, optimizer, scheduler)
        self.reference = reference.to(self.accelerator.device)
        self.kl_ctl = make_kl_controller(config)
        self.running = RunningMoments()
        self.ref_std: float | None = None
        self.iteration = 0
        self.eos = tokenizer.eos_token_id

    @property
    def policy(self) -> PolicyWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    def autocast(self):
        """Every forward pass runs under this (generation and the reference too, not only the prepared model's);
        one context around several passes casts each trainable weight to half precision once."""
        return precision.autocast(self.accelerator.device.type, self.precision)

    # -- one PPO iteration -------------------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One PPO iteration; returns its stats (namespaced metric names)."""
        m = self.config.method
        timings: dict[str, float] = {}
        started = time.perf_counter()

        rollouts = self.generate(self.sampler.take(m.num_rollouts))
        timings["time/generate"] = time.perf_counter() - started

        t = time.perf_counter()
        rollouts.scores = self.score(rollouts)
        timings["time/score"] = time.perf_counter() - t

        t = time.perf_counter()
        rollouts.logprobs, rollouts.values, entropy, rollouts.ref_logprobs = self.policy_forward(rollouts)
        timings["time/forward"] = time.perf_counter() - t

        scores = self.clip_and_scale(rollouts.scores)
        rewards = kl_penalized_rewards(scores, rollouts.logprobs, rollouts.ref_logprobs, rollouts.mask,
                                       self.kl_ctl.value)
        rollouts.advantages, rollouts.returns = gae(rollouts.values, rewards, rollouts.mask, m.gamma, m.lam)

        t = time.perf_counter()
        update_stats = self.update(rollouts)
        timings["time/update"] = time.perf_counter() - t

        kl = sequence_kl(rollouts.logprobs, rollouts.ref_logprobs, rollouts.mask)  # (B,)
        stats = self.rollout_stats(rollouts, kl, entropy, rewards) | update_stats
        mean_kl = self._global_mean(kl)
        for _ in range(m.ppo_epochs):  # trlX updates the controller after each pass over the rollouts
            self.kl_ctl.update(mean_kl, n_steps=self.config.train.batch_size)
        self.iteration += 1
        timings["time/iteration"] = time.perf_counter() - started
        return stats | timings | {"objective/kl_coef_next": self.kl_ctl.value}

    @torch.no_grad()
    def generate(self, prompts: list[str], evaluation: bool = False) -> Rollouts:
        """Sample a response per prompt, `chunk_size` prompts per generate call, in eval mode; with trlX's
        `gen_experience_kwargs` for rollouts when set, `gen_kwargs` for evaluation."""
        m = self.config.method
        gen = (m.gen_kwargs if evaluation else m.rollout_kwargs).model_dump()
        max_prompt = self.config.train.seq_length - m.gen_kwargs.max_new_tokens  # as trlX sizes prompts
        queries, query_masks, responses = [], [], []
        with self.autocast():  # generate samples from float32 logits (it casts them) whatever the forward's dtype
            for i in range(0, len(prompts), m.chunk_size):
                chunk = prompts[i : i + m.chunk_size]
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                     max_length=max_prompt, add_special_tokens=False).to(self.accelerator.device)
                out = self.policy.base.generate(**enc, **{"pad_token_id": self.eos, "eos_token_id": self.eos, **gen})
                queries.append(enc.input_ids)
                query_masks.append(enc.attention_mask)
                responses.append(out[:, enc.input_ids.shape[1]:])
        response_t = _pad_cat(responses, self.eos, left=False)
        mask = response_mask(response_t, self.eos)
        outputs = [self.tokenizer.decode(r[: int(n)], skip_special_tokens=True)
                   for r, n in zip(response_t, mask.sum(1))]
        return Rollouts(list(prompts), outputs, _pad_cat(queries, self.tokenizer.pad_token_id, left=True),
                        _pad_cat(query_masks, 0, left=True), response_t, mask)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        samples = [p + o for p, o in zip(rollouts.prompts, rollouts.outputs)]
        raw = self.reward_fn(samples=samples, prompts=rollouts.prompts, outputs=rollouts.outputs,
                             tokenizer=self.tokenizer)
        return torch.tensor(checked_scores(raw, len(samples)), dtype=torch.float32, device=self.accelerator.device)

    def clip_and_scale(self, scores: torch.Tensor) -> torch.Tensor:
        """trlX's order: clip to +-cliprange_reward (0: no clip), take the statistics of the clipped scores (the
        reference std is the first batch's unless `ref_std` is given), then divide by the running or reference std
        when `scale_reward` says so."""
        m = self.config.method
        if m.cliprange_reward:
            scores = scores.clamp(-m.cliprange_reward, m.cliprange_reward)
        if self.ref_std is None:
            self.ref_std = m.ref_std or (scores.std().item() if len(scores) > 1 else 1.0)
        self.running.update(scores)
        if m.scaling:
            std = self.running.std if m.scaling == "running" else self.ref_std
            scores = scores / (std if std > 1e-8 else 1.0)  # identical scores so far: nothing to scale by (trlX: NaN)
        return scores

    @torch.no_grad()
    def policy_forward(self, rollouts: Rollouts) -> tuple[torch.Tensor, ...]:
        """Log-probs, values and entropy of the sampled responses under the current policy, and their log-probs under
        the reference (a hydra reference continues from this pass's trunk), (B, R) each."""
        q = rollouts.queries.shape[1]
        sequences, attention_mask = rollouts.sequences, rollouts.attention_mask
        keep = response_keep(sequences, q)
        logprobs, values, entropy, ref_logprobs = [], [], [], []
        with self.autocast():
            for sl in self._slices(len(rollouts)):
                seq, att = sequences[sl], attention_mask[sl]
                logits, v, hidden = self.policy(seq, att, keep)
                lp, ent = response_logprobs_and_entropy(logits, seq, q)
                logprobs.append(lp)
                entropy.append(ent)
                values.append(response_values(v, seq, q))
                ref_logprobs.append(response_logprobs(self.reference.logits(seq, att, hidden, keep), seq, q))
        return torch.cat(logprobs), torch.cat(values), torch.cat(entropy), torch.cat(ref_logprobs)

    def _slices(self, n: int) -> list[slice]:
        size = self.config.train.batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def update(self, rollouts: Rollouts) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches of `batch_size` rollouts."""
        m, q = self.config.method, rollouts.queries.shape[1]
        collected: dict[str, list] = {}  # floats, and grad norms as tensors until the end
        seq, att = rollouts.sequences, rollouts.attention_mask
        keep = response_keep(seq, q)
        for _ in range(m.ppo_epochs):
            order = torch.randperm(len(rollouts), device=seq.device)
            for i in range(0, len(rollouts), self.config.train.batch_size):
                idx = order[i : i + self.config.train.batch_size]
                with self.autocast():  # the forward only: log-probs, values and the loss below are float32
                    logits, values, _ = self.model(seq[idx], att[idx], keep)
                logprobs = response_logprobs(logits, seq[idx], q)
                loss, stats = ppo_losses(
                    logprobs=logprobs, values=response_values(values, seq[idx], q),
                    old_logprobs=rollouts.logprobs[idx], old_values=rollouts.values[idx],
                    advantages=rollouts.advantages[idx], returns=rollouts.returns[idx], mask=rollouts.mask[idx],
                    cliprange=m.cliprange, cliprange_value=m.cliprange_value, vf_coef=m.vf_coef)
                self.optimizer.zero_grad()
                self.accelerator.backward(loss)
                if m.max_grad_norm:
                    grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), m.max_grad_norm)
                    collected.setdefault("ppo/grad_norm", []).append(grad_norm)  # read once, at the end
                self.optimizer.step()
                self.scheduler.step()
                for key, value in {"ppo/policy/loss": stats.policy_loss, "ppo/val/loss": stats.value_loss,
                                   "ppo/policy/clipfrac": stats.policy_clipfrac,
                                   "ppo/val/clipfrac": stats.value_clipfrac, "ppo/policy/approx_kl": stats.approx_kl,
                                   "ppo/policy/ratio": stats.ratio_mean,
                                   "ppo/loss/total": stats.policy_loss + m.vf_coef * stats.value_loss}.items():
                    collected.setdefault(key, []).append(value)
        out = {k: float(sum(v) / len(v)) for k, v in collected.items()}
        out["ppo/learning_rate"] = self.scheduler.get_last_lr()[0]
        return out

    def rollout_stats(self, rollouts: Rollouts, kl: torch.Tensor, entropy: torch.Tensor,
                      rewards: torch.Tensor) -> dict[str, float]:
        lengths = rollouts.response_lengths(self.eos)
        return {
            "rollout/reward_mean": self._global_mean(rollouts.scores),
            "rollout/reward_std": rollouts.scores.std().item() if len(rollouts) > 1 else 0.0,
            "rollout/response_length": lengths.mean().item(),
            "rollout/empty_fraction": (lengths == 0).float().mean().item(),
            "objective/kl": self._global_mean(kl),
            "objective/kl_coef": self.kl_ctl.value,
            "objective/entropy": masked_mean(entropy, rollouts.mask).item(),
            "objective/rewards_total": (rewards * rollouts.mask).sum(1).mean().item(),
            "ppo/val/mean": masked_mean(rollouts.values, rollouts.mask).item(),
            "ppo/returns/mean": masked_mean(rollouts.returns, rollouts.mask).item(),
            "ppo/val/explained_variance": explained_variance(rollouts.values, rollouts.returns, rollouts.mask),
        }

    def _global_mean(self, x: torch.Tensor) -> float:
        """Mean over every process's rollouts."""
        return self.accelerator.gather_for_metrics(x.detach()).float().mean().item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of `eval_samples_per_prompt` samples for each fixed eval prompt (plus their KL and length).
        The samples themselves stay in `eval_samples`: {step, prompt, completion, score} each."""
        k = self.config.train.eval_samples_per_prompt
        prompts = [p for p in self.eval_prompts for _ in range(k)]
        rollouts = self.generate(prompts, evaluation=True)
        scores = self.score(rollouts)
        self.eval_samples = [{"step": self.iteration, "prompt": prompt, "completion": completion, "score": score}
                             for prompt, completion, score in zip(rollouts.prompts, rollouts.outputs, scores.tolist())]
        logprobs, _, _, ref_logprobs = self.policy_forward(rollouts)
        kl = sequence_kl(logprobs, ref_logprobs, rollouts.mask)
        lengths = rollouts.response_lengths(self.eos)
        return {"eval/reward_mean": scores.mean().item(), "eval/kl": kl.mean().item(),
                "eval/response_length": lengths.mean().item(),
                "eval/empty_fraction": (lengths == 0).float().mean().item(),
                "eval/positive_fraction": (scores > 0.5).float().mean().item()}

    # -- state for checkpoints -----------------------------------------------------------------------------------------

    def resume_point(self) -> dict:
        """What an iteration changes before its update (data position, RNG): enough to undo one cut short while it
        was still scoring, so that its checkpoint resumes exactly at the iteration's start."""
        return {"sampler": self.sampler.state_dict(), "rng": rng_state()}

    def rewind(self, point: dict) -> None:
        self.sampler.load_state_dict(point["sampler"])
        set_rng_state(point["rng"])

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "value_head": self.policy.value_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "running": self.running.state_dict(),
            "ref_std": self.ref_std,
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.policy.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.running.load_state_dict(state["running"])
        self.ref_std = state["ref_std"]
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])


def rng_state() -> dict:
    """Every generator's state as tensors and numbers, so that it loads with `torch.load(weights_only=True)`."""
    _, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": {"mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state:  # absent in checkpoints written before it was saved
        random.setstate((3, tuple(state["python"]["mt"].tolist()), state["python"]["gauss"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))

