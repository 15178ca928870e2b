"""The end-of-run report, written into the run folder: `report.md` (which checkpoint the examples use and why, eval
reward, KL and length before and after, base vs trained completions with their scores, the config), `report.png`
(reward and KL per step) and `report_reward_kl.png` (eval reward against eval KL: what the reward cost).

Completions come from the generator service and scores from the reward service, so the report shows what a user of
the running system gets, not what the trainer saw in memory."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import yaml

from services.trainer.checkpointing import best_checkpoint
from shared.checkpoints import MANIFEST, CheckpointInfo, scan_checkpoints
from shared.clients import GeneratorClient, RewardClient

EVAL_PROMPTS = "eval_prompts.json"
MIXED_PRECISION_KEY = "train/mixed_precision"  # in each checkpoint's manifest metrics: no, bf16 or fp16
REPORT_PNG = "report.png"
REWARD_KL_PNG = "report_reward_kl.png"
MAX_STEP_LABELS = 20  # more eval points than this: label every k-th (the colour still gives each one's step)


@dataclass
class Choice:
    """The checkpoint the examples use (the best by eval reward, else the last), the last one, and the best's name
    when best.json names a complete checkpoint."""

    examples: CheckpointInfo
    last: CheckpointInfo
    best: str | None


@dataclass
class Samples:
    prompts: list[str]
    base: list[dict]
    base_scores: list[float]
    tuned: list[dict]
    tuned_scores: list[float]


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics lines (metrics.jsonl), oldest first."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def choose_checkpoints(run_dir: Path) -> Choice:
    """The best checkpoint by eval reward (best.json), else the newest, for the examples; FileNotFoundError when
    the run has no complete checkpoint."""
    found = {c.name: c for c in scan_checkpoints(run_dir.parent) if c.run == run_dir.name and c.valid}
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir}")
    last = max(found.values(), key=lambda c: c.step)
    best = best_checkpoint(run_dir)
    best = best if best in found else None
    return Choice(found[best] if best else last, last, best)


def _eval_reward(checkpoint: CheckpointInfo, evals: dict[int, dict]) -> tuple[float | None, int | None]:
    """The eval reward a checkpoint was judged by, and the step of that evaluation: its own step's, else the value
    its manifest carries (step unknown)."""
    if checkpoint.step in evals:
        return evals[checkpoint.step]["eval/reward_mean"], checkpoint.step
    value = checkpoint.metrics.get("eval/reward_mean")
    return (value, None) if isinstance(value, (int, float)) else (None, None)


def _said(value: float | None, step: int | None) -> str:
    return f"{_fmt(value)} at step {step}" if step is not None else _fmt(value)


def choice_sentence(choice: Choice, evals: dict[int, dict]) -> str:
    """Which checkpoint the examples use, and why."""
    examples, last = choice.examples, choice.last
    if choice.best is None:
        return f"Examples use `{last.name}`: the last checkpoint: no evaluation picked a best."
    best = _said(*_eval_reward(examples, evals))
    if examples.name == last.name:
        return f"Examples use `{last.name}`: the last checkpoint, which is also the best (eval reward {best})."
    last_value, _ = _eval_reward(last, evals)
    last_said = "not evaluated" if last_value is None else f"eval reward {_fmt(last_value)}"
    return (f"Examples use `{examples.name}`: the best eval reward ({best}). The last checkpoint is `{last.name}` "
            f"({last_said}).")


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def summary_table(choice: Choice, evals: dict[int, dict], samples: Samples) -> str:
    """Before (the first evaluation, step 0 of a run from scratch), the examples' checkpoint, and the last
    checkpoint when it is another one, each with its step."""
    before = next(iter(evals.values()), {})
    columns = [(f"before (step {before.get('step', 'n/a')})", before, mean(samples.base_scores)),
               (f"examples: `{choice.examples.name}` (step {choice.examples.step})",
                evals.get(choice.examples.step, {}), mean(samples.tuned_scores))]
    if choice.last.name != choice.examples.name:
        columns.append((f"last: `{choice.last.name}` (step {choice.last.step})", evals.get(choice.last.step, {}),
                        None))
    rows = [("eval reward (mean)", "eval/reward_mean"), ("eval KL to reference (nats)", "eval/kl"),
            ("eval response length (tokens)", "eval/response_length")]
    lines = ["| | " + " | ".join(title for title, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(_fmt(record.get(key)) for _, record, _ in columns) + " |"
              for label, key in rows]
    lines.append("| reward of the examples below | " + " | ".join(_fmt(score) for _, _, score in columns) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot(metrics: list[dict], out: Path) -> None:
    """Reward (top) and KL (bottom) per step, rollouts and evaluations."""
    plt = _pyplot()
    rollouts = [m for m in metrics if "rollout/reward_mean" in m]
    evals = [m for m in metrics if "eval/reward_mean" in m]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot([m["step"] for m in rollouts], [m["rollout/reward_mean"] for m in rollouts], label="rollout reward")
    top.plot([m["step"] for m in evals], [m["eval/reward_mean"] for m in evals], "o-", label="eval reward")
    top.set_ylabel("mean reward")
    bottom.plot([m["step"] for m in rollouts], [m["objective/kl"] for m in rollouts], label="rollout KL")
    bottom.plot([m["step"] for m in evals], [m["eval/kl"] for m in evals], "o-", label="eval KL")
    bottom.set_ylabel("KL to reference (nats)")
    bottom.set_xlabel("PPO iteration")
    _save(plt, fig, out, top, bottom)


def _save(plt, fig, out: Path, *axes) -> None:
    """Legend and grid on each of `axes`, then the figure to `out` (closed: a long-lived trainer must not leak)."""
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_reward_kl(metrics: list[dict], out: Path, examples_step: int | None = None) -> None:
    """Eval reward against eval KL, coloured (and labelled) by step, rollouts lighter behind them: how much drift
    from the reference each gain in reward cost. The examples' checkpoint is ringed."""
    plt = _pyplot()
    rollouts = [m for m in metrics if "rollout/reward_mean" in m and "objective/kl" in m]
    evals = [m for m in metrics if "eval/reward_mean" in m and "eval/kl" in m]
    steps = [m["step"] for m in rollouts + evals] or [0]
    colours = {"cmap": "viridis", "vmin": min(steps), "vmax": max(max(steps), min(steps) + 1)}
    fig, ax = plt.subplots(figsize=(8, 6))
    shown = ax.scatter([m["objective/kl"] for m in rollouts], [m["rollout/reward_mean"] for m in rollouts],
                       c=[m["step"] for m in rollouts], s=14, alpha=0.25, label="rollout (each iteration)", **colours)
    if evals:
        ax.plot([m["eval/kl"] for m in evals], [m["eval/reward_mean"] for m in evals], color="grey", lw=0.8)
        shown = ax.scatter([m["eval/kl"] for m in evals], [m["eval/reward_mean"] for m in evals],
                           c=[m["step"] for m in evals], s=55, edgecolors="black", label="eval", zorder=3, **colours)
        every = math.ceil(len(evals) / MAX_STEP_LABELS)
        for i, m in enumerate(evals):
            if i % every == 0 or i == len(evals) - 1:
                ax.annotate(str(m["step"]), (m["eval/kl"], m["eval/reward_mean"]), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
        ringed = [m for m in evals if m["step"] == examples_step]
        if ringed:
            ax.scatter([ringed[-1]["eval/kl"]], [ringed[-1]["eval/reward_mean"]], s=220, facecolors="none",
                       edgecolors="red", linewidths=1.5, label=f"examples' checkpoint (step {examples_step})",
                       zorder=4)
    fig.colorbar(shown, ax=ax, label="PPO iteration")
    ax.set_xlabel("KL to reference (nats)")
    ax.set_ylabel("mean reward")
    _save(plt, fig, out, ax)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _manifest(checkpoint: CheckpointInfo) -> dict:
    return json.loads((checkpoint.path / MANIFEST).read_text())


def sample_examples(run_dir: Path, config: dict, checkpoint: str, reward: RewardClient, generator: GeneratorClient,
                    examples: int, seed: int) -> Samples:
    """The first eval prompts continued by the base and by `checkpoint` (same sampling, same seed), all scored."""
    prompts_file = run_dir / EVAL_PROMPTS
    prompts = json.loads(prompts_file.read_text())[:examples] if prompts_file.exists() else ["I watched The"]
    gen = config.get("method", {}).get("gen_kwargs", {})
    params = {"max_new_tokens": gen.get("max_new_tokens", 40), "top_k": gen.get("top_k", 0),
              "top_p": gen.get("top_p", 1.0), "do_sample": True, "seed": seed}
    base = generator.generate(prompts, checkpoint="base", **params)["completions"]
    tuned = generator.generate(prompts, checkpoint=checkpoint, **params)["completions"]
    return Samples(prompts, base, reward.score([c["text"] for c in base]), tuned,
                   reward.score([c["text"] for c in tuned]))


def _markdown(run_dir: Path, metrics: list[dict], choice: Choice, samples: Samples, config: dict,
              precision: str) -> str:
    evals = {m["step"]: m for m in metrics if "eval/reward_mean" in m}
    times = [m["time"] for m in metrics if "time" in m]
    duration = (max(times) - min(times)) if times else 0.0
    rows = "\n".join(
        f"| {_cell(p)} | {_cell(b['completion'])} | {bs:.3f} | {_cell(t['completion'])} | {ts:.3f} |"
        for p, b, bs, t, ts in zip(samples.prompts, samples.base, samples.base_scores, samples.tuned,
                                   samples.tuned_scores))
    return f"""# PPO run report: {run_dir.name}

Written {time.strftime("%Y-%m-%d %H:%M:%S")}. {choice_sentence(choice, evals)}

## Summary

{summary_table(choice, evals, samples)}

Training took {duration:.0f} s over {max((m["step"] for m in metrics), default=0)} PPO iterations; mixed precision:
{precision}.

![reward and KL per step]({REPORT_PNG})

![eval reward against eval KL, by step]({REWARD_KL_PNG})

## Base vs trained, same prompts and seed

Completions from the generator service (the trained ones from `{choice.examples.name}`), scored by the reward
service.

| prompt | base completion | score | trained completion | score |
|---|---|---|---|---|
{rows}

## Configuration

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```
"""


def write_report(run_dir: Path, reward: RewardClient, generator: GeneratorClient, examples: int = 8,
                 seed: int = 0) -> Path:
    """report.md and both plots in `run_dir`; returns report.md's path."""
    metrics = read_metrics(run_dir)
    choice = choose_checkpoints(run_dir)
    last = _manifest(choice.last)  # the run's config as it ended (a resumed run may have raised total_steps)
    config = last.get("config", {})
    samples = sample_examples(run_dir, config, choice.examples.name, reward, generator, examples, seed)
    precision = last.get("metrics", {}).get(MIXED_PRECISION_KEY, "n/a")
    (run_dir / "report.md").write_text(_markdown(run_dir, metrics, choice, samples, config, precision))
    if metrics:
        plot(metrics, run_dir / REPORT_PNG)
        plot_reward_kl(metrics, run_dir / REWARD_KL_PNG, choice.examples.step)
    return run_dir / "report.md"
