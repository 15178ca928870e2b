"""Rehearse the real IMDB preset (configs/ppo_sentiments.yaml) at real size, offline, and project the full run's time.

The preset needs the hub (lvwerra/gpt2-imdb, lvwerra/distilbert-imdb, the IMDB data set). This script runs it
without: the same config, loaded as `rlhf train` loads it (the trlX translation: rollouts, chunk size, batch size,
PPO epochs, gen_kwargs, intervals), with only the model paths and the data source replaced by what it builds once
under `.cache/bench/rehearsal/`:

- `corpus/`: the tiny kit's corpus (shared/tiny, same seeds and sizes); prompts come from it by the preset's rule
  (data.prompt_words, data.eval_prompts), read by the trainer's own data loading (data source `tiny`, with
  RLHF_TINY_DIR pointing at this folder: no `datasets` needed);
- `gpt2-small/`: GPT-2 small at the hub's exact size (vocabulary 50257, 1024 positions, 12 layers, dim 768), random
  weights, with a byte-level BPE tokenizer trained on the corpus as the tiny kit's (1024 tokens);
- `distilbert-base/`: DistilBERT-base (vocabulary 30522, 6 layers, dim 768, labels NEGATIVE/POSITIVE), random
  weights, with a WordPiece tokenizer trained on the corpus as the tiny kit's (1024 tokens).

Speed does not depend on the weights' values, and the embeddings are real-size. What differs from the real run: the
policy samples over all 50257 ids but its tokenizer knows 1024, so decoding drops the others and the texts scored
are much shorter than real ones (`mean_sample_chars` says how long): the score phase is an underestimate (on a GPU a
few hundredths of a second per iteration either way). A random policy almost never samples EOS, so every response
is the full max_new_tokens, as gpt2-imdb's mostly are.

The run goes through the trainer's real code path: `services.trainer.run.train()` (prompt loading, the initial
evaluation, PPO iterations, the scheduled evaluations and checkpoint saves), with the reward from a real reward
service (`rlhf reward serve` on loopback, as the preset has it) or, with `--reward inprocess`, from the service's
scorer in this process. `train.total_steps` is cut to `--iterations`; the run then evaluates at the start and the
end and saves one checkpoint at the end, which measures one evaluation and one save.

Reported per iteration: seconds by phase (PPOTrainer's timings: generate, score, forward, update, and other = the
rest of step()), peak RSS of this process (and the reward service's), and on a GPU torch.cuda.max_memory_allocated.
The mean skips the first iteration (warm-up) when more than one ran. Projection of the full run: the preset's PPO
iterations (100 for the default config) x mean seconds per iteration + its evaluations (the initial one and those
eval_interval schedules) x one measured evaluation (the last, warm one) + its checkpoint saves x one measured save.
`projected_full_run_with_startup_s` adds model loading and the first iteration's warm-up excess. On a GPU
`target_met` says whether the projection is under 6 minutes.

Run (from the repo root):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rehearsal.py [--iterations 2] [--device cpu|cuda] [--threads 2] \
        [--reward service|inprocess] [--set train.mixed_precision=bf16 ...] [--smoke] [--out result.json]

On 2 shared AMD EPYC cores (float32) one real-size iteration took 295 s (update 250 s, generate 23 s, forward
21 s), one evaluation 33-69 s, a checkpoint save 1.5 s: about 8.5 hours projected. `--smoke` shrinks the config (8
rollouts of 8 tokens, 1 PPO epoch, 4 eval prompts) but keeps the real-size models: about 15 s in all. Building the
corpus and models takes a few seconds. On a GPU: `--device cuda --iterations 4`. Progress goes to stderr; the last
line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: find common.py next to us

import common  # noqa: E402
from common import REPO, log, rounded  # noqa: E402

PRESET = REPO / "configs" / "ppo_sentiments.yaml"
KIT_DIR = REPO / ".cache" / "bench" / "rehearsal"
PHASES = ("generate", "score", "forward", "update")
TARGET_S = 6 * 60  # the GPU target for the whole preset run
# Tiny sizes in the preset's own (trlX) units, for a quick check of the whole path; the models stay real-size.
SMOKE = ["method.num_rollouts=8", "method.chunk_size=8", "train.batch_size=4", "method.ppo_epochs=1",
         "method.gen_kwargs.max_new_tokens=8", "data.eval_prompts=4", "train.eval_samples_per_prompt=1"]


# -- the models and the corpus ----------------------------------------------------------------------------------------

def build_kit(root: Path) -> dict[str, Path]:
    """The corpus and the two real-size models under `root`, each built once (seconds, then about a minute for the
    models on 2 CPU cores), with the tiny kit's recipe for corpus and tokenizers (shared/tiny). `root` is laid out
    as a tiny kit as far as the trainer's data source `tiny` reads one (`corpus/`)."""
    from shared.tiny.build import HELDOUT_SIZE, SEED, TRAIN_SIZE, _atomic_dir
    from shared.tiny.corpus import make_corpus, read_jsonl, write_jsonl
    from shared.tiny.vocab import train_bpe_tokenizer, train_wordpiece_tokenizer

    def write_corpus(tmp: Path) -> None:
        write_jsonl(make_corpus(TRAIN_SIZE, SEED), tmp / "train.jsonl")
        write_jsonl(make_corpus(HELDOUT_SIZE, SEED + 1), tmp / "heldout.jsonl")  # "heldout": the eval split

    _atomic_dir(root, "corpus", write_corpus)
    texts = [r.text for r in read_jsonl(root / "corpus" / "train.jsonl")]
    policy, reward = root / "gpt2-small", root / "distilbert-base"
    # Tokenizer limits as the real models have them (GPT-2's 1024 positions, DistilBERT's 512); trained (seconds)
    # only when their model is missing.
    if not policy.exists():
        common.gpt2_small_random(train_bpe_tokenizer(texts, vocab_size=1024, max_length=1024), policy)
    if not reward.exists():
        common.distilbert_base_random(train_wordpiece_tokenizer(texts, vocab_size=1024, max_length=512), reward)
    return {"kit": root, "policy": policy, "reward": reward}


def param_millions(model_dir: Path) -> float:
    """Parameters saved in the folder (tied ones once), from the safetensors header: no weights loaded."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return rounded(total / 1e6, 1)


# -- the reward --------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def reward_service(model_dir: Path, device: str, dtype: str, threads: int, work: Path):
    """`rlhf reward serve` on a free loopback port, as the preset's reward section expects one; yields (url, pid)."""
    config = {"models": [{"name": "default", "source": str(model_dir), "label": "POSITIVE", "dtype": dtype}],
              "device": device, "log_level": "warning"}
    with common.running_service("reward", config, [], work, "reward", threads=threads, stop_timeout=15) as (url, p):
        yield url, p.pid


def inprocess_reward(model_dir: Path, device: str, dtype: str):
    """The reward service's scorer in this process, in batches of the service's max batch size."""
    from services.reward.scorer import Scorer
    from services.reward.settings import BatchingSettings
    from shared.schemas import ModelSpec

    scorer = Scorer(ModelSpec(source=str(model_dir), label="POSITIVE", dtype=dtype), device=device)
    size = BatchingSettings().max_batch_size

    def reward_fn(samples: list[str], **_) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(samples), size):
            scores += scorer.scores(scorer.forward(scorer.tokenize(samples[i : i + size], truncate=True)))
        return scores

    return reward_fn


def measured(reward_fn, lengths: list[int]):
    """`reward_fn`, noting the length of every text it scores (how far the rehearsal's texts are from real ones)."""
    def wrapper(samples, **kw):
        lengths.extend(len(s) for s in samples)
        return reward_fn(samples, **kw)

    return wrapper


# -- instrumentation --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def timing(owner, name: str, into: list[float]):
    """Time every call of `owner.name` (a public trainer function) into `into`, for the length of the block."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - started)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def service_peak_rss_mb(pid: int | None) -> float | None:
    """VmHWM (peak resident set) of the reward service, from /proc; None in process or where /proc lacks it."""
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return rounded(int(line.split()[1]) / 1024, 1)
    return None


def cuda_mb(value: int) -> float:
    return rounded(value / 2**20, 1)


def resolved_precision() -> str | None:
    """The mixed precision accelerate actually runs with (the trainer's Accelerator, a process-wide state)."""
    with contextlib.suppress(Exception):
        from accelerate.state import AcceleratorState

        return str(AcceleratorState().mixed_precision)
    return None


# -- one rehearsal -----------------------------------------------------------------------------------------------------

def load_preset(args, kit: dict[str, Path], run_root: Path):
    """The preset as the trainer loads it, with the model paths and the data source replaced (and `--set` last)."""
    from services.trainer.config import load_config
    from shared.tiny.kit import use

    use(kit["kit"])  # data source `tiny`: the trainer reads <kit>/corpus itself
    replaced = [f"model.model_path={kit['policy']}", f"tokenizer.tokenizer_path={kit['policy']}",
                "data.source=tiny", f"train.checkpoint_dir={run_root}",
                f"train.torch_threads={args.threads}"]
    return load_config(args.config, replaced + (SMOKE if args.smoke else []) + args.overrides)


def schedule(config) -> dict:
    """What the full run does (before total_steps is cut): its PPO iterations, evaluations and checkpoint saves."""
    n = config.train.total_steps
    return {"iterations": n,
            "evaluations": 1 + sum(config.evaluates_after(i) for i in range(1, n + 1)),  # one before the first step
            "checkpoints": sum(config.checkpoints_after(i) for i in range(1, n + 1)),
            "eval_interval_iterations": rounded(config.train.eval_interval, 4),
            "checkpoint_interval_iterations": rounded(config.train.checkpoint_interval, 4)}


def settings_of(config) -> dict:
    m, t = config.method, config.train
    return {"num_rollouts": m.num_rollouts, "chunk_size": m.chunk_size, "batch_size": t.batch_size,
            "ppo_epochs": m.ppo_epochs, "optimizer_steps_per_iteration": config.optimizer_steps_per_iteration,
            "gen_kwargs": m.gen_kwargs.model_dump(), "rollout_gen_kwargs": m.rollout_kwargs.model_dump(),
            "num_layers_unfrozen": config.model.num_layers_unfrozen, "seq_length": t.seq_length,
            "eval_prompts": config.data.eval_prompts, "eval_samples_per_prompt": t.eval_samples_per_prompt,
            "prompt_words": list(config.data.prompt_words),
            "mixed_precision_config": getattr(t, "mixed_precision", None)}  # once the trainer has the key


def rehearse(config, reward_fn, iterations: int, cuda: bool) -> dict:
    """`iterations` PPO iterations of `config` through train(); per-iteration phases and memory, evaluation and
    checkpoint seconds, and the start-up seconds."""
    import torch

    from services.trainer import run
    from services.trainer.loop import PPOTrainer

    config.train.total_steps = iterations
    records: list[dict] = []
    evals: list[float] = []
    saves: list[float] = []
    precision: dict = {}

    def on_step(record: dict) -> None:
        phases = {k: record[f"time/{k}"] for k in (*PHASES, "iteration")}
        phases["other"] = phases["iteration"] - sum(phases[k] for k in PHASES)
        row = {k: rounded(v, 3) for k, v in phases.items()} | {
            "ended_at": time.perf_counter(), "peak_rss_mb": rounded(peak_rss_mb(), 1),
            "response_tokens": rounded(record["rollout/response_length"], 1)}
        if cuda:
            row["cuda_max_allocated_mb"] = cuda_mb(torch.cuda.max_memory_allocated())
        precision.setdefault("resolved", resolved_precision())
        records.append(row)
        log(f"iteration {record['step']}/{iterations}: {phases['iteration']:.2f} s (generate "
            f"{phases['generate']:.2f}, score {phases['score']:.2f}, forward {phases['forward']:.2f}, update "
            f"{phases['update']:.2f}, other {phases['other']:.2f}); peak RSS {row['peak_rss_mb']:.0f} MB" +
            (f", CUDA max allocated {row['cuda_max_allocated_mb']:.0f} MB" if cuda else ""))

    started = time.perf_counter()
    with timing(PPOTrainer, "evaluate", evals), timing(run, "save_checkpoint", saves):
        status = run.train(config, reward_fn=reward_fn, on_step=on_step)
    if status.state != "finished" or len(records) != iterations:
        raise RuntimeError(f"the run ended {status.state} after {len(records)} iterations: {status.error}")
    if len(evals) < 2 or not saves:  # the trainer no longer goes through the two functions timed above
        raise RuntimeError(f"timed {len(evals)} evaluations and {len(saves)} checkpoint saves, expected 2 and 1: "
                           "does services/trainer/run.py still call PPOTrainer.evaluate and save_checkpoint?")
    # Everything before the first iteration but the initial evaluation: loading, preparing, the run folder.
    first_start = records[0]["ended_at"] - records[0]["iteration"]
    startup = first_start - started - evals[0]
    for row in records:
        del row["ended_at"]
    return {"iterations": records, "evaluation_s": [rounded(s, 3) for s in evals],
            "checkpoint_save_s": [rounded(s, 3) for s in saves], "startup_s": rounded(startup, 2),
            "wall_s": rounded(time.perf_counter() - started, 2), "precision": precision.get("resolved")}


def summarize(measured_run: dict, full: dict) -> dict:
    """Means (the first iteration skipped when more ran) and the projection of the full run."""
    rows = measured_run["iterations"]
    timed_rows = rows[1:] if len(rows) > 1 else rows
    mean = {k: rounded(statistics.fmean(r[k] for r in timed_rows), 3) for k in (*PHASES, "other", "iteration")}
    eval_s, save_s = measured_run["evaluation_s"][-1], measured_run["checkpoint_save_s"][-1]  # the last: warm
    terms = {"iterations_s": full["iterations"] * mean["iteration"], "evaluations_s": full["evaluations"] * eval_s,
             "checkpoints_s": full["checkpoints"] * save_s}
    projected = sum(terms.values())
    one_time = measured_run["startup_s"] + max(0.0, rows[0]["iteration"] - mean["iteration"])
    return {
        "warmup_skipped": len(rows) > 1,
        "mean_s": mean,
        "evaluation_s_used": eval_s, "checkpoint_save_s_used": save_s,
        "projection_terms_s": {k: rounded(v, 1) for k, v in terms.items()},
        "projected_full_run_s": rounded(projected, 1),
        "projected_full_run_min": rounded(projected / 60, 2),
        "projected_full_run_with_startup_s": rounded(projected + one_time, 1),
    }


# -- the script --------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=PRESET, help="the preset (default configs/ppo_sentiments.yaml)")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations to run (default 2 on CPU, 4 on GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on CPU, 4 on GPU)")
    p.add_argument("--reward", choices=("service", "inprocess"), default="service",
                   help="a reward service subprocess on loopback (default), or its scorer in this process")
    p.add_argument("--reward-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the reward model's compute precision (the service's per-model dtype)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override, in the preset's units (repeatable; applied last)")
    p.add_argument("--smoke", action="store_true", help="tiny rollouts and evaluation, real-size models")
    p.add_argument("--kit-dir", type=Path, default=KIT_DIR, help="where the models and corpus are built once")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.iterations = args.iterations or (4 if args.device == "cuda" else 2)
    args.threads = args.threads or (4 if args.device == "cuda" else 2)
    if args.iterations < 1 or args.threads < 1:
        p.error("--iterations and --threads must be at least 1")
    return args


def device_facts(cuda: bool) -> dict:
    import accelerate
    import torch
    import transformers

    facts = {"device": "cuda" if cuda else "cpu", "cpu": common.cpu_name(), "cores": os.cpu_count(),
             "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "accelerate": accelerate.__version__}}
    if cuda:
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def quiet_logging() -> None:
    """The trainer's own lines (the translation notes, its warnings) on stderr; no per-request or progress-bar lines."""
    import transformers

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per scoring request otherwise
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # load and save bars would bury the progress lines


def rehearse_preset(args, kit: dict[str, Path], report: dict, cuda: bool) -> tuple[dict, dict, list[int]]:
    """The preset in a fresh run folder (nothing to resume from), scored as `--reward` says; adds the preset's
    settings and the memory the reward side used to `report`. Returns the measured run, the full run's schedule and
    the length of every text scored."""
    import torch

    with tempfile.TemporaryDirectory(prefix="rlhf-rehearsal-") as tmp:
        work = Path(tmp)
        config = load_preset(args, kit, work / "runs")
        full = schedule(config)
        report["preset"] = settings_of(config) | {"full_run": full}
        log(f"preset: {full['iterations']} PPO iterations, {full['evaluations']} evaluations, {full['checkpoints']} "
            f"checkpoint saves; rehearsing {args.iterations} iterations on {args.device} ({args.threads} threads)")
        lengths: list[int] = []
        with contextlib.ExitStack() as stack:
            service_pid = None
            if args.reward == "service":
                url, service_pid = stack.enter_context(
                    reward_service(kit["reward"], args.device, args.reward_dtype, args.threads, work))
                config.reward.url = url
                from services.trainer.rewards import remote_reward_fn

                reward_fn = remote_reward_fn(config.reward)  # what train() builds itself for the preset
            else:
                reward_fn = inprocess_reward(kit["reward"], args.device, args.reward_dtype)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            result = rehearse(config, measured(reward_fn, lengths), args.iterations, cuda)
            report["reward_service_peak_rss_mb"] = service_peak_rss_mb(service_pid)
            if cuda:  # while the service still runs: every process on the GPU, the service's model too
                free, total = torch.cuda.mem_get_info()
                report["cuda_device_used_mb"] = cuda_mb(total - free)
    return result, full, lengths


def add_results(report: dict, result: dict, full: dict, lengths: list[int], cuda: bool) -> None:
    """The measured run, its summary and projection, memory peaks and, on a GPU, the target, into `report`."""
    import torch

    report["torch_threads"] = torch.get_num_threads()
    # The config's setting (train.mixed_precision, once the trainer has it) and what accelerate ran with.
    report["mixed_precision"] = {"config": report["preset"]["mixed_precision_config"],
                                 "accelerate": result.pop("precision")}
    report |= result | summarize(result, full)
    report["mean_sample_chars"] = rounded(statistics.fmean(lengths), 1) if lengths else None
    report["peak_rss_mb"] = rounded(peak_rss_mb(), 1)
    if cuda:
        report["cuda_max_allocated_mb"] = cuda_mb(torch.cuda.max_memory_allocated())
        report["target_s"] = TARGET_S
        report["target_met"] = report["projected_full_run_s"] < TARGET_S
    else:
        report["target_met"] = None  # the target is about a GPU


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # train() takes a visible GPU; the reward service gets this too
    common.prepare_process(args.threads)
    import torch

    quiet_logging()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    started = time.perf_counter()
    report = device_facts(cuda) | {"config": str(args.config), "overrides": args.overrides, "smoke": args.smoke,
                                   "reward": args.reward, "reward_dtype": args.reward_dtype}
    report["code"] = common.code_version()
    report["load_avg_at_start"] = os.getloadavg()[0]

    t = time.perf_counter()
    kit = build_kit(args.kit_dir)
    report["kit_s"] = rounded(time.perf_counter() - t, 1)
    report["models"] = {"policy": str(kit["policy"]), "policy_params_millions": param_millions(kit["policy"]),
                        "reward": str(kit["reward"]), "reward_params_millions": param_millions(kit["reward"])}
    result, full, lengths = rehearse_preset(args, kit, report, cuda)
    add_results(report, result, full, lengths, cuda)
    skipped = "the first skipped as warm-up" if report["warmup_skipped"] else "one iteration ran"
    log(f"mean {report['mean_s']['iteration']} s per iteration ({skipped}); projected full run "
        f"{report['projected_full_run_s']} s = {report['projected_full_run_min']} min")
    common.print_report(report, started, args.out)

if __name__ == "__main__":
    main(sys.argv[1:])
