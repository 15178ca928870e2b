"""Time per PPO iteration of our trainer against trl's legacy `PPOTrainer` (trl 0.11.4), phase by phase.

What it measures, per model size (`tiny`: the tiny kit's GPT-2 policy, 2 layers, dim 128; `small`: a GPT-2-small-size
model, 12 layers, dim 768, random weights, built from config with the tiny tokenizer and cached in
`.cache/bench/gpt2-small`, the folder bench/generator.py uses too), with both trainers in this process:

1. ours: `services.trainer.loop.PPOTrainer.step()`, built as tests/integration/test_ppo_loop.py builds it (config
   configs/tiny.yaml with overrides); its own timings: generate, score, forward (policy + reference log-probs) and
   update (the PPO epochs), plus `other` (rewards, advantages, stats: the rest of the iteration);
2. trl: `ppo_trainer.generate(queries, return_prompt=False, batch_size=rollouts)` + decoding (generate), the reward
   (score), then `ppo_trainer.step(queries, responses, scores)` (step), with trl's own split of step
   (`time/ppo/forward_pass`, `time/ppo/optimize_step`, ...).

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
policy to train mode for updates (dropout on), ours stays in eval mode. Sampling draws from the same global RNG
in turn, so the two sample different responses: their mean lengths (`response_tokens`) are reported, since the
forward and update cost grows with them.

Each trainer runs one warm-up iteration (not counted), then `--iterations` timed iterations, the two taking turns
(ours first on even iterations, trl first on odd ones) so a change in machine load hits both alike. Reported: means
over the timed iterations of wall seconds per phase and of the process CPU seconds per iteration (less sensitive to
other jobs on a shared machine than wall time), `ratio_to_trl` = ours / trl seconds per iteration (target <= 1), and
per phase ratios.

The first iteration in the process is much slower than the next ones (allocation: AdamW's state, the first backward
pass), whichever trainer runs it: on `small` about 13-17 s against 8-9 s. So the warm-up times logged to stderr do
not compare the trainers; only the timed iterations do.

Run (from the repo root; on 2 cores, `tiny` takes about 15 s, `small --iterations 1` about 1 minute, `small` with
its default 2 iterations about 1.5 minutes):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo.py --sizes tiny,small [--iterations N] [--threads 1] \
        [--rollouts R --minibatch M --epochs E] [--max-new-tokens 20] [--seed 1000] [--out result.json]

Progress goes to stderr; the last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import gc
import statistics
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


def our_config(model_dir: Path, s: Settings):
    """configs/tiny.yaml (lr 1e-4, adaptive KL from 0.1, ...) with this run's sizes; all rollouts in one generate."""
    from services.trainer.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.model_path={model_dir}", f"method.num_rollouts={s.rollouts}", f"method.chunk_size={s.rollouts}",
        f"train.batch_size={s.minibatch}", f"method.ppo_epochs={s.epochs}",
        f"method.gen_kwargs.max_new_tokens={s.max_new_tokens}", f"train.seed={s.seed}",
        f"train.torch_threads={s.threads}", "method.max_grad_norm=1.0"])  # trl clips at 1: same work


def sampling_kwargs(config, eos: int) -> dict:
    """What our generate passes to `model.generate`: the config's gen_kwargs, EOS as pad and stop token."""
    return config.method.gen_kwargs.model_dump() | {"pad_token_id": eos, "eos_token_id": eos}


# -- the two trainers, one iteration each -----------------------------------------------------------------------------

class Ours:
    name = "ours"

    def __init__(self, model_dir: Path, config, prompts: list[str], reward: SentimentReward):
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


class Trl:
    name = "trl"

    def __init__(self, model_dir: Path, config, prompts: list[str], reward: SentimentReward):
        import torch
        from transformers import AutoTokenizer
        from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

        from services.trainer.data import PromptSampler

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.pad_token = self.tokenizer.eos_token  # as ours: pad = EOS, left padding
        self.tokenizer.padding_side = "left"
        torch.manual_seed(config.train.seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(model_dir))
        ref = AutoModelForCausalLMWithValueHead.from_pretrained(str(model_dir))  # same weights as ours' reference
        m, opt = config.method, config.optimizer.kwargs
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
        self.trainer = PPOTrainer(ppo_config, model, ref, self.tokenizer, optimizer=optimizer)
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


def run_pair(ours: Ours, trl: Trl, iterations: int) -> dict[str, list[dict[str, float]]]:
    """Warm-up, then timed iterations taking turns, so load changes on a shared machine hit both alike."""
    for i in range(WARMUP_ITERATIONS):
        for runner in (ours, trl):
            r = timed(runner)
            log(f"  warm-up {i + 1} {runner.name}: {r['iteration']:.2f} s")
    samples = {"ours": [], "trl": []}
    for i in range(iterations):
        for runner in ((ours, trl) if i % 2 == 0 else (trl, ours)):
            r = timed(runner)
            samples[runner.name].append(r)
            detail = (f"forward {r['forward']:.2f} update {r['update']:.2f}" if runner.name == "ours" else
                      f"step {r['step']:.2f} (forward {r.get('time/ppo/forward_pass', NAN):.2f} "
                      f"optimize {r.get('time/ppo/optimize_step', NAN):.2f})")
            log(f"  iteration {i + 1} {runner.name}: {r['iteration']:.2f} s (cpu {r['cpu']:.2f}): generate "
                f"{r['generate']:.2f} score {r['score']:.2f} {detail}; {r['response_tokens']:.1f} response tokens")
    return samples


def summarize(samples: dict[str, list[dict[str, float]]]) -> dict:
    ours, trl = mean_of(samples["ours"]), mean_of(samples["trl"])
    ratio = ours["iteration"] / trl["iteration"]
    # Like for like: trl's step = its forward pass + its optimize step + the rest (rewards, advantages, stats).
    # (NaN, reported as null, if this trl version does not time those parts.)
    trl_forward, trl_optimize = trl.get("time/ppo/forward_pass", NAN), trl.get("time/ppo/optimize_step", NAN)
    pairs = {"generate": (ours["generate"], trl["generate"]), "score": (ours["score"], trl["score"]),
             "forward": (ours["forward"], trl_forward), "update": (ours["update"], trl_optimize),
             "other": (ours["other"], trl["step"] - trl_forward - trl_optimize)}

    def phases(d: dict, keys) -> dict:
        return {k: rounded(d[k], 3) for k in keys}

    return {
        "seconds_per_iteration": rounded(ours["iteration"], 3),
        "trl_seconds_per_iteration": rounded(trl["iteration"], 3),
        "ratio_to_trl": rounded(ratio, 3),
        "target_met": ratio <= 1.0,
        "cpu_seconds_per_iteration": rounded(ours["cpu"], 3),
        "trl_cpu_seconds_per_iteration": rounded(trl["cpu"], 3),
        "cpu_ratio_to_trl": rounded(ours["cpu"] / trl["cpu"], 3),
        "phase_ratio_to_trl": {k: rounded(a / b, 3) if b > 0 else NAN for k, (a, b) in pairs.items()},
        "ours": phases(ours, ("generate", "score", "forward", "update", "other", "iteration"))
        | {"response_tokens": rounded(ours["response_tokens"], 1), "reward_mean": rounded(ours["reward_mean"], 3),
           "kl": rounded(ours["kl"], 4), "iterations_s": [rounded(s["iteration"], 3) for s in samples["ours"]]},
        "trl": phases(trl, ("generate", "score", "step", "iteration"))
        | phases(trl, sorted(k for k in trl if k.startswith("time/")))
        | {"response_tokens": rounded(trl["response_tokens"], 1), "reward_mean": rounded(trl["reward_mean"], 3),
           "kl": rounded(trl["kl"], 4), "iterations_s": [rounded(s["iteration"], 3) for s in samples["trl"]]},
    }


# -- one size, end to end ----------------------------------------------------------------------------------------------

def settings_record(config, s: Settings) -> dict:
    m = config.method
    return {"rollouts": s.rollouts, "minibatch": s.minibatch, "ppo_epochs": s.epochs,
            "generate_batch": m.chunk_size, "max_new_tokens": s.max_new_tokens, "iterations": s.iterations,
            "warmup_iterations": WARMUP_ITERATIONS, "learning_rate": config.optimizer.kwargs["lr"],
            "init_kl_coef": m.init_kl_coef, "adaptive_kl": m.target is not None, "kl_target": m.target,
            "kl_horizon": m.horizon, "vf_coef": m.vf_coef, "cliprange": m.cliprange,
            "cliprange_value": m.cliprange_value, "max_grad_norm": m.max_grad_norm,
            "reward_clip": m.cliprange_reward, "sampling": m.gen_kwargs.model_dump(), "seed": s.seed}


def bench_size(name: str, model_dir: Path, prompts: list[str], reward: SentimentReward, s: Settings) -> dict:
    result = common.gpt2_facts(model_dir)
    log(f"{name}: {result['layers']} layers, dim {result['dim']}, {result['params_millions']} M parameters; "
        f"{s.rollouts} rollouts, minibatch {s.minibatch}, {s.epochs} epochs, {s.max_new_tokens} new tokens")
    config = our_config(model_dir, s)
    ours, trl = Ours(model_dir, config, prompts, reward), Trl(model_dir, config, prompts, reward)
    result["settings"] = settings_record(config, s)
    result.update(summarize(run_pair(ours, trl, s.iterations)))
    log(f"{name}: ours {result['seconds_per_iteration']} s/iteration, trl {result['trl_seconds_per_iteration']} "
        f"s/iteration: ratio {result['ratio_to_trl']} (cpu ratio {result['cpu_ratio_to_trl']}); per phase "
        f"{result['phase_ratio_to_trl']}")
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small")
    p.add_argument("--iterations", type=int, default=None,
                   help="timed iterations per trainer, after one warm-up (default: tiny 3, small 2)")
    p.add_argument("--rollouts", type=int, default=None, help="rollouts per iteration (default: tiny 64, small 16)")
    p.add_argument("--minibatch", type=int, default=None, help="PPO minibatch (default: tiny 16, small 8)")
    p.add_argument("--epochs", type=int, default=None, help="PPO epochs per iteration (default: tiny 4, small 2)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine more threads ran small models far slower)")
    p.add_argument("--seed", type=int, default=1000)
    common.add_output_options(p)
    args = p.parse_args(argv)
    args.sizes = common.split_sizes(p, args.sizes, tuple(DEFAULTS))
    for flag in ("iterations", "rollouts", "minibatch", "epochs", "max_new_tokens", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def settings_for(size: str, args) -> Settings:
    d = DEFAULTS[size]
    s = Settings(rollouts=args.rollouts or d["rollouts"], minibatch=args.minibatch or d["minibatch"],
                 epochs=args.epochs or d["epochs"], iterations=args.iterations or d["iterations"],
                 max_new_tokens=args.max_new_tokens, seed=args.seed, threads=args.threads)
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
    prompts = read_prompts(tiny, args.seed)
    reward = SentimentReward(tiny / "tiny-sentiment")
    for size in args.sizes:
        model_dir = tiny / "tiny-gpt2" if size == "tiny" else common.small_gpt2(tiny / "tiny-gpt2")
        report[size] = bench_size(size, model_dir, prompts, reward, settings_for(size, args))
        gc.collect()  # this size's four models, before the next size loads its own
    common.print_report(report, started, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
