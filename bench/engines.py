"""PPO engines side by side on the tiny preset: learning curves, time per iteration, memory; plus a speed check.

Part `learning` (default settings: 4 engines x 3 seeds x 40 iterations; about 7 minutes on 2 cores, the whole
script with `speed` about 8):

One real reward service (`rlhf reward serve`, the tiny-sentiment classifier, label POSITIVE, in a subprocess on
loopback) scores for every engine over HTTP. Each (engine, seed) trains configs/tiny.yaml in a fresh worker process
(this script re-run as `_worker`), one at a time, with the same prompts, the same eval prompts and the same reward:

  native       services.trainer.run.train(), model.num_layers_unfrozen=2 (trlX's default: on the 2-layer tiny
               model every block trains, embeddings frozen, hydra reference);
  native_full  the same with num_layers_unfrozen=-1 (everything trains, full frozen reference copy);
  trlx         CarperAI/trlX itself (train.engine=trlx, num_layers_unfrozen=2; trlX refuses -1 and 0 here), in its
               own environment (.cache/trlx-env), through train() like the native ones;
  trl          trl 0.11.4's legacy PPOTrainer, through bench/ppo.py's `Trl` runner with the same hyper-parameters,
               rollouts, minibatch and epochs, scoring through the same reward service.

Prompts: training prompts as `rlhf train` makes them for the run's seed (the first 3-5 words of the tiny corpus's
train texts, seeded by train.seed); one fixed set of `--eval-prompts` eval prompts for every engine and seed (the
held-out texts' first words, seeded by the first seed + 1, as `rlhf train` makes them for that seed), one sample
each (train.eval_samples_per_prompt=1). Evaluation at iteration 0 and every `--eval-interval` iterations (and at the
end): eval reward = mean reward-service score of the samples; eval KL = services.trainer.ppo.sequence_kl (Schulman
k3 per response, log-probs of the sampled responses under the current policy vs the initial model), averaged. The
native and trlX engines log these as eval/reward_mean and eval/kl in metrics.jsonl; for trl this script runs the
native evaluation code itself (services.trainer.loop.PPOTrainer.evaluate, on trl's policy in eval mode and trl's
frozen reference model).

Gradient clipping: configs/tiny.yaml clips the gradient norm at 1, trlX cannot clip (the trlX engine refuses a
config that does). So that every engine runs the same algorithm, `--max-grad-norm` defaults to `null` (no clipping)
for all four; `--max-grad-norm 1.0` keeps the preset's clipping for native, native_full and trl and leaves trlx out.

Reported per engine and seed: eval reward and KL at each evaluated iteration; seconds per iteration by phase
(native: generate, score, forward, update, other = the rest of the iteration; trlX: its runner's time/* keys, same
names; trl: generate, score, and its own split of `step` as forward = time/ppo/forward_pass, update =
time/ppo/optimize_step, other = the rest), the first iteration apart (warm-up) from the mean of the others; peak
resident memory (ru_maxrss) of the process that trains: the worker for native and trl; for trlx the trlX runner
(the worker's largest waited-for child, RUSAGE_CHILDREN), with the worker (launcher) beside it. The reward service is
a separate process, in neither number.

Summary per engine: the eval-reward and eval-KL curves' mean and min/max over seeds at each evaluated iteration;
the final-half eval reward (mean over evaluations at iterations >= iterations / 2) per seed; mean seconds per
iteration (iterations 2.., over seeds); eval reward at eval KL = 1 nat (per seed: linear interpolation between the
two evaluations where the (KL, reward) curve first reaches 1 nat; then the mean over seeds, null when any seed's
curve never reaches 1 nat).

Part `speed`: seconds per PPO iteration of the native engine with num_layers_unfrozen=2 vs -1 on a GPT-2-small-size
model (12 layers, dim 768, random weights, the tiny tokenizer; cached in .cache/bench/gpt2-small as bench/ppo.py
does), `--speed-rollouts` 16 rollouts, minibatch 8, 2 epochs, 16 new tokens, scoring through the same reward
service; 1 warm-up + `--speed-iterations` timed iterations each, the two taking turns; ratio = full / unfrozen-2.

Targets (booleans, next to their numbers, under "targets"):
  speed                        small: seconds per iteration full / unfrozen-2 >= 1.5;
  native_not_slower_than_trlx  native's mean seconds per iteration <= trlX's;
  native_within_trlx_spread    native's final-half eval reward (mean over its seeds) lies within [min, max] of
                               trlX's seeds' final-half eval rewards (also reported, not a target: the fraction of
                               evaluated iterations after 0 at which native's mean curve lies in trlX's min/max band);
  native_kl1_ge_trl            native's eval reward at eval KL 1 nat >= trl's (null when either never gets there).

Run (from the repo root; progress on stderr, the last stdout line is one JSON object):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engines.py [--parts learning,speed] [--engines native,native_full,trlx,trl]
        [--seeds 1000,1001,1002] [--iterations 40] [--eval-interval 2] [--eval-prompts 32] [--max-grad-norm null]
        [--speed-iterations 2] [--work .cache/bench/engines] [--png .cache/bench/engines.png] [--out result.json]

Worker logs (the trainers' own output) and run folders are under --work (logs/<engine>-<seed>.log, runs/).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: find common.py next to us

import common  # noqa: E402
from common import REPO, log, rounded  # noqa: E402

ENGINES = ("native", "native_full", "trlx", "trl")
LAYERS = {"native": 2, "native_full": -1, "trlx": 2, "trl": -1}  # model.num_layers_unfrozen (trl: all train)
PHASES = ("generate", "score", "forward", "update", "other", "iteration")
WORKER = "_worker"
DEFAULT_WORK = REPO / ".cache" / "bench" / "engines"
NAN = float("nan")


# -- shared pieces ----------------------------------------------------------------------------------------------------

def read_prompts(tiny: Path, seed: int, n_eval: int) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts) as `rlhf train` makes them for train.seed = `seed` from the tiny corpus
    (services.trainer.run._prompts with data.source tiny, prompt_words [3, 5], data.eval_prompts `n_eval`)."""
    from services.trainer.data import load_texts, make_prompts
    from shared.tiny import kit

    kit.use(tiny)  # where data.source `tiny` is read from
    train_texts, eval_texts = load_texts("tiny")
    return make_prompts(train_texts, (3, 5), seed), make_prompts(eval_texts, (3, 5), seed + 1, n_eval)


def tiny_overrides(spec: dict) -> list[str]:
    """configs/tiny.yaml as every engine runs it here (only what the benchmark needs differs from the preset)."""
    n = spec["iterations"]
    return [f"model.model_path={spec['model_dir']}", f"reward.url={spec['reward_url']}",
            f"train.total_steps={n}", f"train.eval_interval={spec['eval_interval']}",
            f"train.checkpoint_interval={n}", f"train.checkpoint_dir={spec['runs_dir']}",
            f"train.run_name={spec['engine']}-{spec['seed']}", f"train.seed={spec['seed']}", "train.resume=false",
            "train.tensorboard=false", "train.eval_samples_per_prompt=1", f"train.torch_threads={spec['threads']}",
            f"data.eval_prompts={len(spec['eval_prompts'])}",
            f"method.max_grad_norm={spec['max_grad_norm']}",
            f"model.num_layers_unfrozen={LAYERS[spec['engine']]}",
            "train.mixed_precision=no"]  # float32 on every engine: trlX and trl 0.11.4 run float32 here


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


# -- the worker: one engine, one seed, in a fresh process --------------------------------------------------------------

def worker_main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    common.prepare_process(spec["threads"])
    import ppo as ppo_bench  # bench/ppo.py

    ppo_bench.quiet_libraries()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from services.trainer.config import load_config

    overrides = tiny_overrides(spec) + (["train.engine=trlx"] if spec["engine"] == "trlx" else [])
    config = load_config(REPO / "configs" / "tiny.yaml", overrides)
    shutil.rmtree(config.run_dir, ignore_errors=True)
    started = time.perf_counter()
    if spec["engine"] == "trl":
        result = run_trl(config, spec)
    else:
        result = run_project_engine(config, spec)
    result["wall_s"] = rounded(time.perf_counter() - started, 1)
    print(json.dumps(common.without_nan(result)), flush=True)


def run_project_engine(config, spec: dict) -> dict:
    """native / native_full / trlx: the job as `rlhf train` runs it; numbers from its metrics.jsonl."""
    from services.trainer.run import train

    status = train(config, prompts=spec["prompts"], eval_prompts=spec["eval_prompts"])  # engine: config's
    if status.state != "finished":
        raise RuntimeError(f"run ended {status.state}: {status.error or status.message}")
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [{"step": r["step"], "reward": r["eval/reward_mean"], "kl": r["eval/kl"],
              "response_length": r.get("eval/response_length")} for r in records if "eval/reward_mean" in r]
    iterations = []
    for r in records:
        if "rollout/reward_mean" not in r:
            continue
        t = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("time/")}
        t["other"] = t["iteration"] - sum(t.get(k, 0.0) for k in ("generate", "score", "forward", "update"))
        iterations.append({"step": r["step"], **{k: t.get(k, NAN) for k in PHASES},
                           "response_tokens": r.get("rollout/response_length")})
    out = {"via": "train", "evals": evals, "iterations": iterations,
           "peak_rss_mb": rounded(peak_rss_mb(resource.RUSAGE_SELF), 1), "peak_rss_of": "worker process"}
    if spec["engine"] == "trlx":
        out["launcher_peak_rss_mb"] = out["peak_rss_mb"]
        out["peak_rss_mb"] = rounded(peak_rss_mb(resource.RUSAGE_CHILDREN), 1)
        out["peak_rss_of"] = "trlX runner (largest child of the worker)"
    return out


def _logits_only(base):
    """trl's policy (its `pretrained_model`) as the native evaluation calls a policy: (logits, values, hiddens)."""
    import torch

    from services.trainer.policy import position_ids

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, input_ids, attention_mask, keep=0):
            out = self.base(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), output_hidden_states=True, use_cache=False,
                            logits_to_keep=keep)
            return out.logits, out.logits.new_zeros(out.logits.shape[:2]), out.hidden_states

    return LogitsOnly()


class _Reference:
    """trl's frozen reference model as the native evaluation calls a reference."""

    def __init__(self, model):
        self.model = model

    def logits(self, input_ids, attention_mask, hidden_states=None, keep=0):
        from services.trainer.policy import position_ids

        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                          use_cache=False, logits_to_keep=keep).logits


def trl_evaluator(config, runner, reward_fn, eval_prompts: list[str]):
    """The native `PPOTrainer.evaluate` (same generate, score, forward and KL code) bound to trl's models: an
    evaluation-only instance, with only the attributes `evaluate` reads."""
    from accelerate import Accelerator

    from services.trainer.loop import PPOTrainer

    ev = PPOTrainer.__new__(PPOTrainer)
    ev.config, ev.tokenizer, ev.reward_fn, ev.eval_prompts = config, runner.tokenizer, reward_fn, eval_prompts
    ev.accelerator = Accelerator(cpu=True)
    ev.precision = "no"  # trl's models run float32
    ev.model = _logits_only(runner.trainer.model.pretrained_model)
    ev.reference = _Reference(runner.trainer.ref_model.pretrained_model)
    ev.eos = runner.tokenizer.eos_token_id
    runner.tokenizer.truncation_side = config.tokenizer.truncation_side

    def evaluate(step: int) -> dict:
        base = runner.trainer.model.pretrained_model
        training = base.training
        base.eval()  # trl leaves the policy in train mode (dropout) after a step; evaluation is without dropout
        try:
            r = ev.evaluate()
        finally:
            base.train(training)
        return {"step": step, "reward": r["eval/reward_mean"], "kl": r["eval/kl"],
                "response_length": r["eval/response_length"]}

    return evaluate


def run_trl(config, spec: dict) -> dict:
    """trl 0.11.4's legacy PPOTrainer via bench/ppo.py's runner, scored by the reward service, evaluated natively."""
    import ppo as ppo_bench

    from services.trainer.rewards import remote_reward_fn

    remote = remote_reward_fn(config.reward)
    runner = ppo_bench.Trl(Path(config.model.model_path), config, spec["prompts"], lambda texts: remote(texts))
    evaluate = trl_evaluator(config, runner, remote, spec["eval_prompts"])
    evals, iterations = [evaluate(0)], []
    for it in range(1, config.train.total_steps + 1):
        r = runner.iteration()
        phases = {"generate": r["generate"], "score": r["score"], "forward": r.get("time/ppo/forward_pass", NAN),
                  "update": r.get("time/ppo/optimize_step", NAN), "iteration": r["iteration"]}
        phases["other"] = phases["iteration"] - sum(phases[k] for k in ("generate", "score", "forward", "update"))
        iterations.append({"step": it, **phases, "response_tokens": r["response_tokens"]})
        if config.evaluates_after(it):
            evals.append(evaluate(it))
            print(f"iteration {it}: eval reward {evals[-1]['reward']:.3f} kl {evals[-1]['kl']:.3f}",
                  file=sys.stderr, flush=True)
    return {"via": "bench/ppo.py Trl", "evals": evals, "iterations": iterations,
            "peak_rss_mb": rounded(peak_rss_mb(resource.RUSAGE_SELF), 1), "peak_rss_of": "worker process"}


# -- the orchestrator: reward service, workers, summary ---------------------------------------------------------------

def run_worker(spec: dict, work: Path, timeout: float) -> dict:
    tag = f"{spec['engine']}-{spec['seed']}"
    spec_path, log_path = work / "specs" / f"{tag}.json", work / "logs" / f"{tag}.log"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    from shared.tiny.kit import ENV_VAR

    env = {**common.child_env(spec["threads"]), ENV_VAR: spec["tiny_dir"]}  # the worker's kit_dir()
    with open(log_path, "wb") as err:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), WORKER, str(spec_path)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=err, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{tag}: worker exited {done.returncode}; last lines of {log_path}:\n"
                           f"{common.tail(log_path)}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def reward_at_kl(evals: list[dict], target: float = 1.0) -> float:
    """Eval reward where the (KL, reward) curve, in iteration order, first reaches `target` nats (linear
    interpolation between the two evaluations around it); NaN if it never does."""
    prev = None
    for e in evals:
        if e["kl"] >= target:
            if prev is None or e["kl"] == prev["kl"]:
                return e["reward"]
            w = (target - prev["kl"]) / (e["kl"] - prev["kl"])
            return prev["reward"] + w * (e["reward"] - prev["reward"])
        prev = e
    return NAN


def final_half(evals: list[dict], iterations: int) -> float:
    return statistics.fmean(e["reward"] for e in evals if e["step"] >= iterations / 2)


def band(curves: list[list[float]]) -> dict:
    cols = list(zip(*curves))
    return {"mean": [rounded(statistics.fmean(c), 4) for c in cols], "min": [rounded(min(c), 4) for c in cols],
            "max": [rounded(max(c), 4) for c in cols]}


def summarize_engine(runs: dict[int, dict], iterations: int) -> dict:
    seeds = sorted(runs)
    steps = [e["step"] for e in runs[seeds[0]]["evals"]]
    for s in seeds:
        if [e["step"] for e in runs[s]["evals"]] != steps:
            raise RuntimeError(f"seed {s} evaluated at other iterations: {[e['step'] for e in runs[s]['evals']]}")
    later = [it for s in seeds for it in runs[s]["iterations"] if it["step"] > 1]  # the first one warms up
    first = [it for s in seeds for it in runs[s]["iterations"] if it["step"] == 1]
    kl1 = {s: reward_at_kl(runs[s]["evals"]) for s in seeds}
    halves = {s: final_half(runs[s]["evals"], iterations) for s in seeds}
    return {
        "eval_steps": steps,
        "eval_reward": band([[e["reward"] for e in runs[s]["evals"]] for s in seeds]),
        "eval_kl": band([[e["kl"] for e in runs[s]["evals"]] for s in seeds]),
        "final_half_reward": {"per_seed": {str(s): rounded(v, 4) for s, v in halves.items()},
                              "mean": rounded(statistics.fmean(halves.values()), 4),
                              "min": rounded(min(halves.values()), 4), "max": rounded(max(halves.values()), 4)},
        "final_eval_reward_mean": rounded(statistics.fmean(runs[s]["evals"][-1]["reward"] for s in seeds), 4),
        "final_eval_kl_mean": rounded(statistics.fmean(runs[s]["evals"][-1]["kl"] for s in seeds), 4),
        "reward_at_kl_1": {"per_seed": {str(s): rounded(v, 4) for s, v in kl1.items()},
                           "mean": rounded(statistics.fmean(kl1.values()), 4)},  # NaN (null) if any is NaN
        "seconds_per_iteration": {k: rounded(statistics.fmean(it[k] for it in later), 4) for k in PHASES},
        "first_iteration_s": rounded(statistics.fmean(it["iteration"] for it in first), 3),
        "response_tokens_mean": rounded(statistics.fmean(it["response_tokens"] for s in seeds
                                                         for it in runs[s]["iterations"]), 2),
        "peak_rss_mb": {"mean": rounded(statistics.fmean(runs[s]["peak_rss_mb"] for s in seeds), 1),
                        "max": rounded(max(runs[s]["peak_rss_mb"] for s in seeds), 1),
                        "of": runs[seeds[0]]["peak_rss_of"]},
        "run_wall_s_mean": rounded(statistics.fmean(runs[s]["wall_s"] for s in seeds), 1),
    }


def learning(args, tiny: Path, reward_url: str) -> tuple[dict, dict]:
    """Every (engine, seed) run in turn; the engine order rotates per seed so a change of load hits all alike."""
    _, eval_prompts = read_prompts(tiny, args.seeds[0], args.eval_prompts)
    runs: dict[str, dict[int, dict]] = {e: {} for e in args.engines}
    failures: dict[str, str] = {}
    for i, seed in enumerate(args.seeds):
        train_prompts, _ = read_prompts(tiny, seed, args.eval_prompts)
        order = args.engines[i % len(args.engines):] + args.engines[:i % len(args.engines)]
        for engine in order:
            if engine in failures:
                continue
            spec = {"engine": engine, "seed": seed, "iterations": args.iterations,
                    "eval_interval": args.eval_interval, "model_dir": str(tiny / "tiny-gpt2"),
                    "tiny_dir": str(tiny), "reward_url": reward_url, "runs_dir": str(args.work / "runs"),
                    "threads": args.threads, "max_grad_norm": args.max_grad_norm, "prompts": train_prompts,
                    "eval_prompts": eval_prompts}
            log(f"{engine} seed {seed}: {args.iterations} iterations ...")
            try:
                r = run_worker(spec, args.work, timeout=args.run_timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failures[engine] = str(exc)[-3000:]
                log(f"{engine} seed {seed} FAILED (engine left out): {str(exc)[-1500:]}")
                continue
            runs[engine][seed] = r
            last = r["evals"][-1]
            later = [it["iteration"] for it in r["iterations"] if it["step"] > 1]
            log(f"{engine} seed {seed}: eval reward {r['evals'][0]['reward']:.3f} -> {last['reward']:.3f}, KL "
                f"{last['kl']:.2f}; {statistics.fmean(later):.3f} s/iteration; peak RSS {r['peak_rss_mb']} MB; "
                f"{r['wall_s']} s")
    per_run = {e: {str(s): {"evals": [{k: rounded(v, 4) if isinstance(v, float) else v for k, v in ev.items()}
                                      for ev in r["evals"]],
                            "seconds_per_iteration": {k: rounded(statistics.fmean(
                                it[k] for it in r["iterations"] if it["step"] > 1), 4) for k in PHASES},
                            "first_iteration_s": rounded(r["iterations"][0]["iteration"], 3),
                            "peak_rss_mb": r["peak_rss_mb"], "peak_rss_of": r["peak_rss_of"],
                            **({"launcher_peak_rss_mb": r["launcher_peak_rss_mb"]}
                               if "launcher_peak_rss_mb" in r else {}),
                            "via": r["via"], "wall_s": r["wall_s"]}
                       for s, r in seed_runs.items()} for e, seed_runs in runs.items()}
    summary = {e: summarize_engine(seed_runs, args.iterations) for e, seed_runs in runs.items()
               if seed_runs and e not in failures}
    out = {"eval_prompts": len(eval_prompts), "eval_samples_per_prompt": 1, "per_run": per_run, "summary": summary,
           "failures": failures}
    return out, runs


# -- the speed part ----------------------------------------------------------------------------------------------------

SPEED_NAMES = {2: "unfrozen_2", -1: "full"}  # model.num_layers_unfrozen -> the report's key


def speed_trainer(args, layers: int, model_dir: Path, reward_url: str, prompts: list[str], eval_prompts: list[str]):
    """A native PPOTrainer with the speed settings, built as run.py builds one, `layers` top blocks training."""
    import torch

    from services.trainer.config import load_config
    from services.trainer.data import PromptSampler
    from services.trainer.loop import PPOTrainer
    from services.trainer.policy import PolicyWithValueHead, freeze_trunk, load_policy_and_tokenizer, make_reference
    from services.trainer.rewards import remote_reward_fn

    s = args
    config = load_config(REPO / "configs" / "tiny.yaml", [
        f"model.model_path={model_dir}", f"reward.url={reward_url}", f"method.num_rollouts={s.speed_rollouts}",
        f"method.chunk_size={s.speed_rollouts}", f"train.batch_size={s.speed_minibatch}",
        f"method.ppo_epochs={s.speed_epochs}", f"method.gen_kwargs.max_new_tokens={s.speed_new_tokens}",
        f"train.seed={args.seeds[0]}", f"train.torch_threads={args.threads}",
        f"method.max_grad_norm={args.max_grad_norm}", f"model.num_layers_unfrozen={layers}"])
    torch.manual_seed(config.train.seed)  # as run.py: before the value head is built
    base, tokenizer = load_policy_and_tokenizer(str(model_dir))
    reference = make_reference(base, layers)  # as run.py builds it
    freeze_trunk(base, layers)
    policy = PolicyWithValueHead(base, config.model.value_head_hidden)
    trainer = PPOTrainer(config, policy, reference, tokenizer, remote_reward_fn(config.reward),
                         PromptSampler(prompts, config.train.seed), eval_prompts)
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log(f"speed: num_layers_unfrozen={layers}: {type(reference).__name__}, {trained / 1e6:.1f} M trainable "
        "parameters")
    return trainer


def timed_step(trainer, label: str) -> dict:
    """One PPO iteration of `trainer`: its seconds by phase and its mean response length."""
    gc.collect()
    stats = trainer.step()
    t = {k: stats[f"time/{k}"] for k in ("generate", "score", "forward", "update", "iteration")}
    t["other"] = t["iteration"] - sum(t[k] for k in ("generate", "score", "forward", "update"))
    t["response_tokens"] = stats["rollout/response_length"]
    log(f"  {label}: {t['iteration']:.2f} s (generate {t['generate']:.2f} score {t['score']:.2f} "
        f"forward {t['forward']:.2f} update {t['update']:.2f}); {t['response_tokens']:.1f} response tokens")
    return t


def speed(args, tiny: Path, reward_url: str) -> dict:
    model_dir = common.small_gpt2(tiny / "tiny-gpt2")
    facts = common.gpt2_facts(model_dir)
    prompts, eval_prompts = read_prompts(tiny, args.seeds[0], 4)
    s = args
    trainers = {layers: speed_trainer(args, layers, model_dir, reward_url, prompts, eval_prompts)
                for layers in (2, -1)}
    samples: dict[int, list[dict]] = {2: [], -1: []}
    for layers in (2, -1):
        timed_step(trainers[layers], f"warm-up {SPEED_NAMES[layers]}")
    for i in range(args.speed_iterations):
        for layers in ((2, -1) if i % 2 == 0 else (-1, 2)):
            samples[layers].append(timed_step(trainers[layers], f"iteration {i + 1} {SPEED_NAMES[layers]}"))
    means = {layers: {k: statistics.fmean(x[k] for x in v) for k in v[0]} for layers, v in samples.items()}
    ratio = means[-1]["iteration"] / means[2]["iteration"]
    log(f"speed: full {means[-1]['iteration']:.2f} s, unfrozen-2 {means[2]['iteration']:.2f} s: ratio {ratio:.2f}")
    return facts | {
        "settings": {"rollouts": s.speed_rollouts, "minibatch": s.speed_minibatch, "ppo_epochs": s.speed_epochs,
                     "max_new_tokens": s.speed_new_tokens, "warmup_iterations": 1,
                     "timed_iterations": s.speed_iterations,
                     "max_grad_norm": None if args.max_grad_norm == "null" else float(args.max_grad_norm)},
        **{SPEED_NAMES[layers]: {k: rounded(v, 3) for k, v in m.items()}
           | {"iterations_s": [rounded(x["iteration"], 3) for x in samples[layers]]} for layers, m in means.items()},
        "ratio_full_to_unfrozen_2": rounded(ratio, 3),
        "phase_ratio_full_to_unfrozen_2": {k: rounded(means[-1][k] / means[2][k], 3) if means[2][k] > 0 else NAN
                                           for k in ("generate", "score", "forward", "update", "other")},
    }


# -- the plot and the targets ------------------------------------------------------------------------------------------

COLORS = {"native": "tab:blue", "native_full": "tab:green", "trlx": "tab:red", "trl": "tab:purple"}


def plot(summary: dict, runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for engine, s in summary.items():
        c, x = COLORS.get(engine), s["eval_steps"]
        for ax, key in ((axes[0], "eval_reward"), (axes[1], "eval_kl")):
            ax.plot(x, s[key]["mean"], color=c, lw=2, label=f"{engine} (mean of {len(runs[engine])} seeds)")
            ax.fill_between(x, s[key]["min"], s[key]["max"], color=c, alpha=0.18, lw=0)
        for r in runs[engine].values():
            axes[2].scatter([e["kl"] for e in r["evals"]], [e["reward"] for e in r["evals"]], color=c, s=9,
                            alpha=0.3, lw=0)
        axes[2].plot(s["eval_kl"]["mean"], s["eval_reward"]["mean"], color=c, lw=1.5, marker="o", ms=3,
                     label=engine)
    axes[0].set(title="eval reward (mean line, min-max band over seeds)", xlabel="PPO iteration",
                ylabel="mean reward-service score (POSITIVE prob)")
    axes[1].set(title="eval KL to the initial model (k3, per response)", xlabel="PPO iteration", ylabel="nats")
    axes[2].set(title="eval reward vs eval KL (line: mean over seeds; dots: seeds)", xlabel="eval KL (nats)",
                ylabel="eval reward")
    axes[2].axvline(1.0, color="grey", ls="--", lw=1)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(report: dict) -> dict:
    out: dict = {}
    sp = report.get("speed")
    if sp:
        out["speed"] = {"met": sp["ratio_full_to_unfrozen_2"] >= 1.5, "ratio_full_to_unfrozen_2":
                        sp["ratio_full_to_unfrozen_2"], "threshold": 1.5}
    summary = report.get("learning", {}).get("summary", {})
    native, trlx, trl = summary.get("native"), summary.get("trlx"), summary.get("trl")
    if native and trlx:
        a, b = native["seconds_per_iteration"]["iteration"], trlx["seconds_per_iteration"]["iteration"]
        out["native_not_slower_than_trlx"] = {"met": a <= b, "native_s": a, "trlx_s": b,
                                              "ratio_native_to_trlx": rounded(a / b, 3),
                                              "criterion": "mean seconds per iteration, iterations 2.., all seeds"}
        fh, lo, hi = native["final_half_reward"]["mean"], trlx["final_half_reward"]["min"], \
            trlx["final_half_reward"]["max"]
        curve, trlx_band = native["eval_reward"], trlx["eval_reward"]
        inside = [low <= m <= high for m, low, high, step in
                  zip(curve["mean"], trlx_band["min"], trlx_band["max"], native["eval_steps"]) if step > 0]
        out["native_within_trlx_spread"] = {
            "met": lo <= fh <= hi, "native_final_half_reward_mean": fh, "trlx_final_half_reward_min": lo,
            "trlx_final_half_reward_max": hi,
            "criterion": "native's final-half eval reward (mean over evaluations at iterations >= N/2, then over "
                         "seeds) within [min, max] of trlX's per-seed final-half eval rewards",
            "pointwise_fraction_inside": rounded(sum(inside) / len(inside), 3) if inside else NAN,
            "pointwise_note": "fraction of evaluated iterations > 0 where native's mean curve lies within trlX's "
                              "min-max band over seeds (reported, not the target)"}
    if native and trl:
        a, b = native["reward_at_kl_1"]["mean"], trl["reward_at_kl_1"]["mean"]
        ok = a >= b if math.isfinite(a) and math.isfinite(b) else None
        out["native_kl1_ge_trl"] = {"met": ok, "native_reward_at_kl_1": a, "trl_reward_at_kl_1": b,
                                    "note": "null when either engine's curve (some seed) never reaches 1 nat"}
    return out


# -- main --------------------------------------------------------------------------------------------------------------

def split_list(p: argparse.ArgumentParser, flag: str, value: str, known: tuple[str, ...]) -> list[str]:
    items = [s.strip() for s in value.split(",") if s.strip()]
    if not items or set(items) - set(known):
        p.error(f"{flag} takes a comma-separated list of {', '.join(known)}, got {value!r}")
    return items


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="learning,speed", help="comma-separated: learning, speed")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--seeds", default="1000,1001,1002")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--eval-interval", type=int, default=2)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--max-grad-norm", default="null",
                   help="method.max_grad_norm for every engine (default null: trlX cannot clip; a number leaves "
                        "trlx out)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run-timeout", type=float, default=1200, help="seconds one (engine, seed) run may take")
    p.add_argument("--speed-rollouts", type=int, default=16)
    p.add_argument("--speed-minibatch", type=int, default=8)
    p.add_argument("--speed-epochs", type=int, default=2)
    p.add_argument("--speed-new-tokens", type=int, default=16)
    p.add_argument("--speed-iterations", type=int, default=2)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="worker logs, specs and run folders")
    p.add_argument("--png", type=Path, default=None, help="plot path (default <work>.png, i.e. "
                   ".cache/bench/engines.png)")
    common.add_output_options(p)
    args = p.parse_args(argv)
    args.parts = split_list(p, "--parts", args.parts, ("learning", "speed"))
    args.engines = split_list(p, "--engines", args.engines, ENGINES)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.max_grad_norm.lower() in ("null", "none", ""):
        args.max_grad_norm = "null"
    elif "trlx" in args.engines:
        log("--max-grad-norm set: trlX cannot clip the gradient, leaving trlx out")
        args.engines = [e for e in args.engines if e != "trlx"]
    if not args.seeds or args.iterations < 2 or args.eval_interval < 1 or args.eval_prompts < 1:
        p.error("need seeds, at least 2 iterations (the first one is a warm-up), and an eval interval and eval "
                "prompts of at least 1")
    if args.speed_rollouts % args.speed_minibatch:
        p.error("--speed-rollouts must be a multiple of --speed-minibatch")
    args.work = args.work.resolve()
    args.png = (args.png or args.work.with_suffix(".png")).resolve()
    return args


def versions() -> dict:
    import ppo as ppo_bench

    out = ppo_bench.versions()
    try:
        from services.trainer.trlx_engine import engine_versions

        v = engine_versions()
        out["trlx_env"] = {k: v.get(k) for k in ("trlx", "transformers", "accelerate", "torch")}
    except Exception as exc:  # noqa: BLE001 - no trlX environment: said in the report
        out["trlx_env"] = f"unavailable: {exc}"
    return out


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    common.prepare_process(args.threads)
    import ppo as ppo_bench

    ppo_bench.quiet_libraries()
    started = time.perf_counter()
    settings = {"parts": args.parts, "engines": args.engines, "seeds": args.seeds, "iterations": args.iterations,
                "eval_interval": args.eval_interval, "eval_prompts": args.eval_prompts,
                "max_grad_norm": None if args.max_grad_norm == "null" else float(args.max_grad_norm),
                "layers_unfrozen": {e: LAYERS[e] for e in args.engines}, "versions": versions()}
    report = common.report_header(args.threads, settings)
    report["code"] = common.code_version()
    tiny = common.tiny_dir(args.tiny_dir, ("tiny-gpt2", "tiny-sentiment", "corpus/train.jsonl"))
    args.work.mkdir(parents=True, exist_ok=True)
    reward_config = {"models": [{"name": "sentiment", "source": str(tiny / "tiny-sentiment"), "label": "POSITIVE",
                                 "score": "prob"}], "device": "cpu", "log_level": "warning"}
    with common.running_service("reward", reward_config, [], args.work, "reward", threads=args.threads,
                                stop_timeout=15) as (url, proc):
        log(f"reward service (tiny-sentiment, POSITIVE) at {url}, pid {proc.pid}")
        report["reward_service"] = {"model": "tiny-sentiment", "label": "POSITIVE", "score": "prob",
                                    "process": "separate (rlhf reward serve), not in any peak RSS"}
        if "learning" in args.parts:
            report["learning"], runs = learning(args, tiny, url)
            if report["learning"]["summary"]:
                plot(report["learning"]["summary"], {e: r for e, r in runs.items()
                                                     if e in report["learning"]["summary"]}, args.png,
                     f"tiny preset, {args.iterations} iterations, seeds {args.seeds}, {args.eval_prompts} eval "
                     f"prompts x 1 sample; max_grad_norm {args.max_grad_norm}; {common.cpu_name()}")
                report["png"] = str(args.png)
                log(f"plot written to {args.png}")
        if "speed" in args.parts:
            report["speed"] = speed(args, tiny, url)
    report["targets"] = targets(report)
    common.print_report(report, started, args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        worker_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
