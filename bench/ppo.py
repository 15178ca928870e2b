"""Time per PPO iteration of our trainer against trl's legacy `PPOTrainer` (trl 0.11.4), phase by phase.

What it measures, per model size (`tiny`: the tiny kit's GPT-2 policy, 2 layers, dim 128; `small`: a GPT-2-small-size
model, 12 layers, dim 768, random weights, built from config with the tiny tokenizer and cached in
`.cache/bench/gpt2-small`, the folder bench/generator.py uses too), with both trainers in this process:

1. ours: `services.trainer.loop.PPOTrainer.step()`, built as tests/integration/test_ppo_loop.py builds it (config
   configs/tiny.yaml with overrides), once per `--precisions` value (`train.mixed_precision`: `no` is float32, `bf16`
   autocasts the forward passes with float32 weights, optimizer and PPO math); its own timings: generate, score,
   forward (policy + reference log-probs) and update (the PPO epochs), plus `other` (rewards, advantages, stats: the
   rest of the iteration);
2. trl: `ppo_trainer.generate(queries, return_prompt=False, batch_size=rollouts)` + decoding (generate), the reward
   (score), then `ppo_trainer.step(queries, responses, scores)` (step), with trl's own split of step
   (`time/ppo/forward_pass`, `time/ppo/optimize_step`, ...). trl's legacy trainer runs float32, as it does by
   default; every precision of ours is compared with the same trl iterations.

Both start from the same weights (both load the same folder with `from_pretrained`), see the same prompts in the same
order (one seeded `PromptSampler` each, same seed; prompts are the first 3-5 words of the tiny corpus's train texts,
as `rlhf train` makes them) and share one reward function: the tiny sentiment classifier's POSITIVE probability of
prompt + response, in this process (no reward service), so `score` costs the same on both sides. Both use the same
settings: rollouts per iteration (= trl's batch_size), minibatch (= trl's mini_batch_size, also the forward batch on
both sides), PPO epochs, AdamW with our hyper-parameters (trl gets the same optimizer object type, not its default
Adam), adaptive KL from 0.1 (target 6, horizon 10000), vf_coef 1, clip ranges 0.2, grad-norm clip 1, reward clip 10,
no early stopping, sampling with do_sample, top_k 0, top_p 1, temperature 1, `--max-new-tokens` new tokens, all
rollouts in one generate call.

What still differs (by design of each library): our value head is Linear(h, 2h) -> ReLU -> Linear(2h, 1), trl's a
single Linear(h, 1); trl's reference is a value-head model (its values are computed and dropped); trl switches the
policy to train mode for updates (dropout on), ours stays in eval mode; ours steps AdamW with torch's fused kernel
(the same update), trl the per-tensor loop it is given; ours computes the LM head only at the positions that
predict the response. Sampling draws from the same global RNG in turn, so the trainers sample different responses:
their mean lengths (`response_tokens`) are reported, since the forward and update cost grows with them.

Each trainer runs one warm-up iteration (not counted), then `--iterations` timed iterations, the trainers taking
turns (each iteration starts with the next one) so a change in machine load hits all alike. Reported: means over the
timed iterations of wall seconds per phase and of the process CPU seconds per iteration (less sensitive to other
jobs on a shared machine than wall time), `ratio_to_trl` = ours / trl seconds per iteration and `speedup_vs_trl` =
trl / ours (target >= 1.5: `speedup_target_met`), and per phase ratios. The top-level keys are ours at the precision
`rlhf train` runs by default on this machine (`precision`: what `auto` resolves to, if it was measured); every
precision's numbers are in `by_precision`, `ratio_to_trl_by_precision` and `speedup_vs_trl_by_precision`. Peak
resident memory (`peak_rss_mb_by_runner`) is measured per trainer in a fresh process that builds that trainer alone
and runs two iterations (in the timing process all trainers' models are resident at once: `max_rss_mb`).

`--part learning` checks that mixed precision learns as well as float32: `rlhf train` on configs/tiny.yaml (the
preset as it is, 64 eval prompts every 5 iterations) for `--iterations` (default 40) iterations at each precision and
`--seeds` seeds, with the reward in this process (the tiny sentiment classifier's POSITIVE probability, which is what
the preset's reward service serves); it reports each run's final eval reward, the float32 runs' min and max, and
`bf16_within_fp32_spread` (the bf16 runs' mean final eval reward lies within the float32 runs' [min, max]), and the
same on the mean of the evals in the last quarter of each run (`late_...`: one eval swings by +-0.05).

The first iteration in the process is much slower than the next ones (allocation: AdamW's state, the first backward
pass), whichever trainer runs it: on `small` about 13-17 s against 8-9 s. So the warm-up times logged to stderr do
not compare the trainers; only the timed iterations do.

Run (from the repo root; on 2 quiet cores, `tiny` takes about 40 s, `small --iterations 1` about 1.5 minutes,
`small` with its default 2 iterations about 2 minutes, peak-memory children included; `--part learning` with 3 seeds
about 2.5 minutes):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo.py --sizes tiny,small [--precisions no,bf16] [--iterations N] \
        [--threads 1] [--rollouts R --minibatch M --epochs E] [--max-new-tokens 20] [--seed 1000] [--out result.json]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo.py --part learning [--precisions no,bf16] [--seeds 3] \
        [--iterations 40] [--out result.json]

Progress goes to stderr; the last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: find common.py next to us

import common  # noqa: E402
from common import REPO, log, rounded  # noqa: E402

# Per size: rollouts per iteration, minibatch, PPO epochs, timed iterations. `small` is smaller so one run of it
# stays within a few minutes on 2 cores.
DEFAULTS = {"tiny": {"rollouts": 64, "minibatch": 16, "epochs": 4, "iterations": 3},
            "small": {"rollouts": 16, "minibatch": 8, "epochs": 2, "iterations": 2}}
WARMUP_ITERATIONS = 1
SPEEDUP_TARGET = 1.5  # trl seconds / ours seconds per iteration
LEARNING_ITERATIONS = 40  # the tiny preset's total_steps
LATE_FRACTION = 0.75  # `late_eval_reward`: the mean of the evals from this fraction of the run on
NAN = float("nan")


@dataclass(frozen=True)
class Settings:
    rollouts: int
    minibatch: int
    epochs: int
    iterations: int
    max_new_tokens: int
    seed: int
    threads: int
    precisions: tuple[str, ...] = ("no",)


# -- the shared pieces: prompts, reward, configuration ----------------------------------------------------------------

def read_prompts(tiny: Path, seed: int) -> list[str]:
    """Training prompts as `rlhf train` makes them from the tiny corpus: the first 3-5 words of each text, seeded."""
    from services.trainer.data import make_prompts
    from shared.tiny.corpus import read_jsonl

    texts = [r.text for r in read_jsonl(tiny / "corpus" / "train.jsonl")]
    return make_prompts(texts, (3, 5), seed)


class SentimentReward:
    """The tiny sentiment classifier's POSITIVE probability per text: one batched forward pass per call.

    In this process rather than the reward service, so the comparison is about the trainers; both call this same
    object, so its cost is the same on both sides.
    """

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
        self.label = {v: int(k) for k, v in self.model.config.id2label.items()}["POSITIVE"]
        self.max_length = min(self.model.config.max_position_embeddings, self.tokenizer.model_max_length)

    def __call__(self, texts: list[str]) -> list[float]:
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**enc).logits  # (B, labels)
        return logits.softmax(-1)[:, self.label].tolist()


def our_config(model_dir: Path, s: Settings, precision: str = "no"):
    """configs/tiny.yaml (lr 1e-4, adaptive KL from 0.1, ...) with this run's sizes; all rollouts in one generate."""
    from services.trainer.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.model_path={model_dir}", f"method.num_rollouts={s.rollouts}", f"method.chunk_size={s.rollouts}",
        f"train.batch_size={s.minibatch}", f"method.ppo_epochs={s.epochs}",
        f"method.gen_kwargs.max_new_tokens={s.max_new_tokens}", f"train.seed={s.seed}",
        f"train.torch_threads={s.threads}", "method.max_grad_norm=1.0",  # trl clips at 1: same work
        f"train.mixed_precision={precision}"])


def sampling_kwargs(config, eos: int) -> dict:
    """What our generate passes to `model.generate`: the config's gen_kwargs, EOS as pad and stop token."""
    return config.method.gen_kwargs.model_dump() | {"pad_token_id": eos, "eos_token_id": eos}


# -- the two trainers, one iteration each -----------------------------------------------------------------------------

class Ours:
    def __init__(self, model_dir: Path, config, prompts: list[str], reward: SentimentReward):
        self.precision = config.train.mixed_precision
        self.name = ours_key(self.precision)
        import torch

        from services.trainer.data import PromptSampler
        from services.trainer.loop import PPOTrainer
        from services.trainer.policy import FullReference, PolicyWithValueHead, load_policy_and_tokenizer

        torch.manual_seed(config.train.seed)  # as `rlhf train` does before building: seeds the value head
        base, tokenizer = load_policy_and_tokenizer(str(model_dir))
        self.trainer = PPOTrainer(config, PolicyWithValueHead(base), FullReference(base), tokenizer,
                                  lambda samples, **kw: reward(samples), PromptSampler(prompts, config.train.seed),
                                  prompts[:4])

    def iteration(self) -> dict[str, float]:
        stats = self.trainer.step()
        phases = {k: stats[f"time/{k}"] for k in ("generate", "score", "forward", "update", "iteration")}
        # Rewards, advantages and stats: what step() does between and after its timed phases.
        phases["other"] = phases["iteration"] - sum(phases[k] for k in ("generate", "score", "forward", "update"))
        return phases | {"response_tokens": stats["rollout/response_length"],
                         "reward_mean": stats["rollout/reward_mean"], "kl": stats["objective/kl"]}


def ours_key(precision: str) -> str:
    return f"ours_{precision}"


class Trl:
    """trl 0.11.4's legacy PPOTrainer, float32 as it runs by default."""

    name = "trl"

    def __init__(self, model_dir: Path, config, prompts: list[str], reward: SentimentReward):
        import torch
        from transformers import AutoTokenizer
        from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

        from services.trainer.data import PromptSampler
        from services.trainer.precision import make_accelerator

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.pad_token = self.tokenizer.eos_token  # as ours: pad = EOS, left padding
        self.tokenizer.padding_side = "left"
        torch.manual_seed(config.train.seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(model_dir))
        ref = AutoModelForCausalLMWithValueHead.from_pretrained(str(model_dir))  # same weights as ours' reference
        m, opt = config.method, config.optimizer.torch_kwargs()
        ppo_config = PPOConfig(
            batch_size=m.num_rollouts, mini_batch_size=config.train.batch_size, gradient_accumulation_steps=1,
            ppo_epochs=m.ppo_epochs, learning_rate=opt["lr"], adap_kl_ctrl=m.target is not None,
            init_kl_coef=m.init_kl_coef, target=m.target or 6.0, horizon=m.horizon, gamma=m.gamma, lam=m.lam,
            cliprange=m.cliprange, cliprange_value=m.cliprange_value, vf_coef=m.vf_coef,
            max_grad_norm=m.max_grad_norm, score_clip=m.cliprange_reward, early_stopping=False,
            seed=config.train.seed, log_with=None)
        # Our optimizer (AdamW, our betas, eps and weight decay), not trl's default Adam: same update cost.
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opt["lr"],
                                      betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"])
        # Accelerate's state is process-wide and ours may have left it in bf16: put it back to float32 for trl.
        make_accelerator("no")
        self.trainer = PPOTrainer(ppo_config, model, ref, self.tokenizer, optimizer=optimizer)
        assert not self.trainer.accelerator.native_amp, "the trl baseline must run in float32"
        self.reward, self.rollouts = reward, m.num_rollouts
        self.sampler = PromptSampler(prompts, config.train.seed)  # the same prompt sequence as ours
        self.gen = sampling_kwargs(config, self.tokenizer.eos_token_id)

    def iteration(self) -> dict[str, float]:
        import torch

        started = time.perf_counter()
        prompts = self.sampler.take(self.rollouts)
        # Tokenizing and decoding count as generation, as in ours (its generate does both).
        queries = [self.tokenizer(p, add_special_tokens=False, return_tensors="pt").input_ids[0] for p in prompts]
        responses = self.trainer.generate(queries, return_prompt=False, batch_size=self.rollouts, **self.gen)
        outputs = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        t_score = time.perf_counter()
        scores = [torch.tensor(s, dtype=torch.float32)
                  for s in self.reward([p + o for p, o in zip(prompts, outputs)])]
        t_step = time.perf_counter()
        stats = self.trainer.step(queries, responses, scores)
        ended = time.perf_counter()
        eos = self.tokenizer.eos_token_id
        lengths = [len(r) - int(len(r) > 0 and r[-1].item() == eos) for r in responses]  # EOS not counted, as ours
        return ({"generate": t_score - started, "score": t_step - t_score, "step": ended - t_step,
                 "iteration": ended - started}
                | {k: float(v) for k, v in stats.items() if k.startswith("time/")}
                | {"response_tokens": statistics.fmean(lengths),
                   "reward_mean": statistics.fmean(s.item() for s in scores), "kl": float(stats["objective/kl"])})


# -- timing ------------------------------------------------------------------------------------------------------------

def timed(runner) -> dict[str, float]:
    """One iteration, with the process CPU seconds it took (all threads) next to its wall-clock phases."""
    gc.collect()  # garbage from the other trainer's iteration is not this one's cost
    cpu = time.process_time()
    out = runner.iteration()
    return out | {"cpu": time.process_time() - cpu}


def mean_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(s[k] for s in samples) for k in samples[0]}


def run_all(runners: list, iterations: int) -> dict[str, list[dict[str, float]]]:
    """Warm-up, then timed iterations taking turns (each iteration starts one runner later), so load changes on a
    shared machine hit all alike."""
    for i in range(WARMUP_ITERATIONS):
        for runner in runners:
            r = timed(runner)
            log(f"  warm-up {i + 1} {runner.name}: {r['iteration']:.2f} s")
    samples = {runner.name: [] for runner in runners}
    for i in range(iterations):
        shift = i % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            r = timed(runner)
            samples[runner.name].append(r)
            detail = (f"step {r['step']:.2f} (forward {r.get('time/ppo/forward_pass', NAN):.2f} "
                      f"optimize {r.get('time/ppo/optimize_step', NAN):.2f})" if runner.name == "trl" else
                      f"forward {r['forward']:.2f} update {r['update']:.2f}")
            log(f"  iteration {i + 1} {runner.name}: {r['iteration']:.2f} s (cpu {r['cpu']:.2f}): generate "
                f"{r['generate']:.2f} score {r['score']:.2f} {detail}; {r['response_tokens']:.1f} response tokens")
    return samples


def summarize(ours_samples: list[dict[str, float]], trl_samples: list[dict[str, float]]) -> dict:
    ours, trl = mean_of(ours_samples), mean_of(trl_samples)
    ratio = ours["iteration"] / trl["iteration"]
    # Like for like: trl's step = its forward pass + its optimize step + the rest (rewards, advantages, stats).
    # (NaN, reported as null, if this trl version does not time those parts.)
    trl_forward, trl_optimize = trl.get("time/ppo/forward_pass", NAN), trl.get("time/ppo/optimize_step", NAN)
    pairs = {"generate": (ours["generate"], trl["generate"]), "score": (ours["score"], trl["score"]),
             "forward": (ours["forward"], trl_forward), "update": (ours["update"], trl_optimize),
             "other": (ours["other"], trl["step"] - trl_forward - trl_optimize)}

    def phases(d: dict, keys) -> dict:
        return {k: rounded(d[k], 3) for k in keys}

    def facts(d: dict, samples: list[dict[str, float]]) -> dict:
        return {"response_tokens": rounded(d["response_tokens"], 1), "reward_mean": rounded(d["reward_mean"], 3),
                "kl": rounded(d["kl"], 4), "iterations_s": [rounded(s["iteration"], 3) for s in samples]}

    return {
        "seconds_per_iteration": rounded(ours["iteration"], 3),
        "trl_seconds_per_iteration": rounded(trl["iteration"], 3),
        "ratio_to_trl": rounded(ratio, 3),
        "speedup_vs_trl": rounded(1 / ratio, 3),
        "target_met": ratio <= 1.0,
        "cpu_seconds_per_iteration": rounded(ours["cpu"], 3),
        "trl_cpu_seconds_per_iteration": rounded(trl["cpu"], 3),
        "cpu_ratio_to_trl": rounded(ours["cpu"] / trl["cpu"], 3),
        "phase_ratio_to_trl": {k: rounded(a / b, 3) if b > 0 else NAN for k, (a, b) in pairs.items()},
        "ours": phases(ours, ("generate", "score", "forward", "update", "other", "iteration"))
        | facts(ours, ours_samples),
        "trl": phases(trl, ("generate", "score", "step", "iteration"))
        | phases(trl, sorted(k for k in trl if k.startswith("time/"))) | facts(trl, trl_samples),
    }


def summarize_precisions(samples: dict[str, list[dict[str, float]]], precisions: list[str], headline: str) -> dict:
    """Today's keys for ours at `headline` (the precision `rlhf train` runs by default here), plus each precision's
    numbers against the same trl iterations."""
    per = {p: summarize(samples[ours_key(p)], samples["trl"]) for p in precisions}
    speedup = per[headline]["speedup_vs_trl"]
    return per[headline] | {
        "precision": headline,
        "ratio_to_trl_by_precision": {p: per[p]["ratio_to_trl"] for p in precisions},
        "speedup_vs_trl_by_precision": {p: per[p]["speedup_vs_trl"] for p in precisions},
        "speedup_target": SPEEDUP_TARGET,
        "speedup_target_met": speedup >= SPEEDUP_TARGET,
        "by_precision": {p: {k: v for k, v in per[p].items() if k != "trl" and not k.startswith("trl_")}
                         for p in precisions},
    }


# -- one size, end to end ----------------------------------------------------------------------------------------------

def settings_record(config, s: Settings) -> dict:
    m = config.method
    return {"rollouts": s.rollouts, "minibatch": s.minibatch, "ppo_epochs": s.epochs,
            "generate_batch": m.chunk_size, "max_new_tokens": s.max_new_tokens, "iterations": s.iterations,
            "warmup_iterations": WARMUP_ITERATIONS, "learning_rate": config.optimizer.kwargs.lr,
            "init_kl_coef": m.init_kl_coef, "adaptive_kl": m.target is not None, "kl_target": m.target,
            "kl_horizon": m.horizon, "vf_coef": m.vf_coef, "cliprange": m.cliprange,
            "cliprange_value": m.cliprange_value, "max_grad_norm": m.max_grad_norm,
            "reward_clip": m.cliprange_reward, "sampling": m.gen_kwargs.model_dump(), "seed": s.seed}


def build_runners(model_dir: Path, prompts: list[str], reward: SentimentReward, s: Settings,
                  only: str | None = None) -> list:
    """trl, then ours at each precision (trl first: see its docstring); `only`: that one runner alone."""
    wanted = [name for name in ("trl", *map(ours_key, s.precisions)) if only in (None, name)]
    return [Trl(model_dir, our_config(model_dir, s), prompts, reward) if name == "trl" else
            Ours(model_dir, our_config(model_dir, s, name.removeprefix("ours_")), prompts, reward) for name in wanted]


def peak_rss_alone(size: str, runner: str, s: Settings, tiny: Path) -> float:
    """Peak RSS (MB) of a fresh process that builds `runner` alone and runs its warm-up and one more iteration:
    the models, optimizer state and activations of that trainer (plus the interpreter, torch and the reward
    model), which in the timing process are mixed with the other trainers'."""
    flags = {"sizes": size, "only": runner, "iterations": 1, "rollouts": s.rollouts, "minibatch": s.minibatch,
             "epochs": s.epochs, "max_new_tokens": s.max_new_tokens, "threads": s.threads, "seed": s.seed,
             "precisions": ",".join(s.precisions), "tiny_dir": tiny}
    cmd = [sys.executable, str(Path(__file__).resolve()),
           *[part for k, v in flags.items() for part in (f"--{k.replace('_', '-')}", str(v))]]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, timeout=900)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])["peak_rss_mb"]


def bench_size(name: str, model_dir: Path, prompts: list[str], reward: SentimentReward, s: Settings,
               headline: str, tiny: Path) -> dict:
    result = common.gpt2_facts(model_dir)
    log(f"{name}: {result['layers']} layers, dim {result['dim']}, {result['params_millions']} M parameters; "
        f"{s.rollouts} rollouts, minibatch {s.minibatch}, {s.epochs} epochs, {s.max_new_tokens} new tokens; ours "
        f"at {', '.join(s.precisions)}")
    runners = build_runners(model_dir, prompts, reward, s)
    result["settings"] = settings_record(our_config(model_dir, s), s) | {"precisions": list(s.precisions)}
    result.update(summarize_precisions(run_all(runners, s.iterations), list(s.precisions), headline))
    del runners
    gc.collect()
    log(f"{name}: ours ({headline}) {result['seconds_per_iteration']} s/iteration, trl "
        f"{result['trl_seconds_per_iteration']} s/iteration: speedup {result['speedup_vs_trl']} (by precision "
        f"{result['speedup_vs_trl_by_precision']}); per phase {result['phase_ratio_to_trl']}")
    peaks = {runner: rounded(peak_rss_alone(name, runner, s, tiny), 0)
             for runner in ("trl", *map(ours_key, s.precisions))}
    result["peak_rss_mb_by_runner"] = peaks
    result["peak_rss_mb"], result["trl_peak_rss_mb"] = peaks[ours_key(headline)], peaks["trl"]
    for p in s.precisions:
        result["by_precision"][p]["peak_rss_mb"] = peaks[ours_key(p)]
    log(f"{name}: peak RSS of each trainer alone (MB): {peaks}")
    return result


def measure_alone(args, tiny: Path, reward: SentimentReward) -> None:
    """The child of `peak_rss_alone`: one runner, warm-up plus `--iterations`, then its peak RSS as JSON."""
    size = args.sizes[0]
    model_dir = tiny / "tiny-gpt2" if size == "tiny" else common.small_gpt2(tiny / "tiny-gpt2")
    s = settings_for(size, args)
    (runner,) = build_runners(model_dir, read_prompts(tiny, args.seed), reward, s, only=args.only)
    for _ in range(WARMUP_ITERATIONS + s.iterations):
        runner.iteration()
    print(json.dumps({"runner": args.only, "peak_rss_mb": common.max_rss_mb()}), flush=True)


# -- learning: does a mixed-precision run learn as well as float32 runs do? ------------------------------------------

# The preset's eval (64 prompts x 2 samples) swings by +-0.05 from one eval to the next, as much as 3 seeds spread:
# this check measures each policy on 256 prompts x 4 samples instead, so the spread it compares is the seeds'.
LEARNING_EVAL_PROMPTS, LEARNING_EVAL_SAMPLES = 256, 4


def learning_run(tiny: Path, reward: SentimentReward, precision: str, seed: int, iterations: int, threads: int,
                 work: Path) -> dict:
    """`rlhf train` on configs/tiny.yaml (seed and precision set), with the reward in this process: the tiny
    sentiment classifier's POSITIVE probability, what the preset's reward service serves by default."""
    from services.trainer.config import load_config
    from services.trainer.run import train

    config = load_config(REPO / "configs" / "tiny.yaml", [
        f"model.model_path={tiny / 'tiny-gpt2'}", f"train.checkpoint_dir={work}", f"train.run_name={precision}-{seed}",
        f"train.total_steps={iterations}", f"train.checkpoint_interval={iterations}", f"train.seed={seed}",
        f"train.mixed_precision={precision}", f"train.torch_threads={threads}", "train.tensorboard=false",
        "train.resume=false", f"data.eval_prompts={LEARNING_EVAL_PROMPTS}",
        f"train.eval_samples_per_prompt={LEARNING_EVAL_SAMPLES}"])
    started = time.perf_counter()
    status = train(config, reward_fn=lambda samples, **kw: reward(samples))
    evals = [(h["step"], h["eval/reward_mean"]) for h in status.history if "eval/reward_mean" in h]
    seconds = time.perf_counter() - started
    late = [r for step, r in evals if step >= LATE_FRACTION * iterations]
    return {"final_eval_reward": rounded(status.eval_reward_mean, 4),
            "late_eval_reward": rounded(statistics.fmean(late), 4), "seconds": rounded(seconds, 1),
            "eval_curve": [[step, rounded(r, 3)] for step, r in evals]}


def bench_learning(tiny: Path, reward: SentimentReward, precisions: list[str], seeds: list[int], iterations: int,
                   threads: int) -> dict:
    """Final eval reward per seed and precision; a mixed precision passes when its mean over seeds lies within the
    float32 (`no`) runs' seed-to-seed spread. The same check on the mean of the evals in the last quarter of the run
    (`late_eval_reward`) is reported beside it."""
    import tempfile

    from shared.tiny import kit

    kit.use(tiny)  # the preset's data section reads the tiny corpus from there
    runs: dict[str, dict[int, dict]] = {p: {} for p in precisions}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-learning-") as work:
        for seed in seeds:  # seed by seed, all precisions: machine-load changes hit every precision alike
            for p in precisions:
                runs[p][seed] = learning_run(tiny, reward, p, seed, iterations, threads, Path(work))
                log(f"  {p} seed {seed}: final eval reward {runs[p][seed]['final_eval_reward']} "
                    f"({runs[p][seed]['seconds']} s)")
    out: dict = {"preset": "configs/tiny.yaml", "reward": "in-process tiny-sentiment POSITIVE probability",
                 "iterations": iterations, "seeds": seeds,
                 "seconds_per_run": {p: rounded(statistics.fmean(r["seconds"] for r in runs[p].values()), 1)
                                     for p in precisions}}
    for key, prefix in (("final_eval_reward", ""), ("late_eval_reward", "late_")):
        values = {p: [runs[p][seed][key] for seed in seeds] for p in precisions}
        out[key] = values
        out[f"mean_{key}"] = {p: rounded(statistics.fmean(v), 4) for p, v in values.items()}
        if "no" in values:
            lo, hi = min(values["no"]), max(values["no"])
            within = {p: lo <= statistics.fmean(v) <= hi for p, v in values.items() if p != "no"}
            out |= {f"{prefix}fp32_min": lo, f"{prefix}fp32_max": hi, f"{prefix}within_fp32_spread": within}
            if "bf16" in within:
                out[f"{prefix}bf16_within_fp32_spread"] = within["bf16"]
    return out | {"runs": runs}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("speed", "learning"), default="speed",
                   help="speed: ours against trl per iteration; learning: final eval reward per precision and seed")
    p.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small (speed)")
    p.add_argument("--precisions", default="no,bf16",
                   help="comma-separated train.mixed_precision values ours runs at (no, bf16, fp16, auto)")
    p.add_argument("--iterations", type=int, default=None,
                   help="speed: timed iterations per trainer, after one warm-up (default: tiny 3, small 2); "
                        f"learning: PPO iterations per run (default {LEARNING_ITERATIONS})")
    p.add_argument("--seeds", type=int, default=3, help="learning: runs per precision, seeds --seed, --seed + 1, ...")
    p.add_argument("--rollouts", type=int, default=None, help="rollouts per iteration (default: tiny 64, small 16)")
    p.add_argument("--minibatch", type=int, default=None, help="PPO minibatch (default: tiny 16, small 8)")
    p.add_argument("--epochs", type=int, default=None, help="PPO epochs per iteration (default: tiny 4, small 2)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine more threads ran small models far slower)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a peak-RSS child: this one runner alone
    common.add_output_options(p)
    args = p.parse_args(argv)
    args.sizes = common.split_sizes(p, args.sizes, tuple(DEFAULTS))
    for flag in ("iterations", "seeds", "rollouts", "minibatch", "epochs", "max_new_tokens", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    args.precisions, args.headline = resolve_precisions(p, args.precisions)
    return args


def resolve_precisions(p: argparse.ArgumentParser, value: str) -> tuple[tuple[str, ...], str]:
    """The precisions to run as this machine resolves them (auto -> bf16 or no), without repeats, and the headline
    one: what `rlhf train` runs by default here (auto), else the first given."""
    from services.trainer import precision

    try:
        resolved = tuple(dict.fromkeys(precision.resolve(v.strip()) for v in value.split(",") if v.strip()))
        default = precision.resolve("auto")
    except precision.MixedPrecisionError as exc:
        p.error(f"--precisions: {exc}")
    if not resolved:
        p.error("--precisions names none")
    return resolved, default if default in resolved else resolved[0]


def settings_for(size: str, args) -> Settings:
    d = DEFAULTS[size]
    s = Settings(rollouts=args.rollouts or d["rollouts"], minibatch=args.minibatch or d["minibatch"],
                 epochs=args.epochs or d["epochs"], iterations=args.iterations or d["iterations"],
                 max_new_tokens=args.max_new_tokens, seed=args.seed, threads=args.threads,
                 precisions=args.precisions)
    if s.rollouts % s.minibatch:
        raise SystemExit(f"{size}: rollouts ({s.rollouts}) must be a multiple of minibatch ({s.minibatch})")
    return s


def quiet_libraries() -> None:
    """trl 0.11's deprecation notices and transformers' load bars would bury the progress lines."""
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="No dataset is provided")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "accelerate": accelerate.__version__}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    common.prepare_process(args.threads)
    quiet_libraries()
    started = time.perf_counter()
    report = common.report_header(args.threads, {"seed": args.seed, "versions": versions()})
    report["code"] = common.code_version()
    tiny = common.tiny_dir(args.tiny_dir, ("tiny-gpt2", "tiny-sentiment", "corpus/train.jsonl"))
    reward = SentimentReward(tiny / "tiny-sentiment")
    if args.part == "learning":
        seeds = [args.seed + i for i in range(args.seeds)]
        report["learning"] = bench_learning(tiny, reward, list(args.precisions), seeds,
                                            args.iterations or LEARNING_ITERATIONS, args.threads)
        common.print_report(report, started, args.out)
        return
    if args.only:
        measure_alone(args, tiny, reward)
        return
    prompts = read_prompts(tiny, args.seed)
    for size in args.sizes:
        model_dir = tiny / "tiny-gpt2" if size == "tiny" else common.small_gpt2(tiny / "tiny-gpt2")
        report[size] = bench_size(size, model_dir, prompts, reward, settings_for(size, args), args.headline, tiny)
        gc.collect()  # this size's models, before the next size loads its own
    report["max_rss_mb"] = rounded(common.max_rss_mb(), 0)  # this process: every trainer of every size at once
    common.print_report(report, started, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
