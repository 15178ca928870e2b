"""The end-of-run report: `report.md` (config, duration, reward and KL before and after, base vs trained
completions with their scores) and `report.png` (reward and KL per step), written into the run folder.

Completions come from the generator service and scores from the reward service, so the report shows what a user of
the running system gets, not what the trainer saw in memory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import mean

import yaml

from shared.checkpoints import scan_checkpoints
from shared.clients import GeneratorClient, RewardClient

EVAL_PROMPTS = "eval_prompts.json"
MIXED_PRECISION_KEY = "train/mixed_precision"  # in each checkpoint's manifest metrics: no, bf16 or fp16


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _trained_checkpoint(run_dir: Path) -> tuple[str, dict]:
    """The best checkpoint by eval reward (else the newest) and its manifest."""
    found = {c.name: c for c in scan_checkpoints(run_dir.parent) if c.run == run_dir.name and c.valid}
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir}")
    best_file = run_dir / "best.json"
    name = json.loads(best_file.read_text())["checkpoint"] if best_file.exists() else None
    if name not in found:
        name = max(found.values(), key=lambda c: c.step).name
    return name, json.loads((found[name].path / "manifest.json").read_text())


def plot(metrics: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rollouts = [m for m in metrics if "rollout/reward_mean" in m]
    evals = [m for m in metrics if "eval/reward_mean" in m]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot([m["step"] for m in rollouts], [m["rollout/reward_mean"] for m in rollouts], label="rollout reward")
    top.plot([m["step"] for m in evals], [m["eval/reward_mean"] for m in evals], "o-", label="eval reward")
    top.set_ylabel("mean reward")
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot([m["step"] for m in rollouts], [m["objective/kl"] for m in rollouts], label="rollout KL")
    bottom.plot([m["step"] for m in evals], [m["eval/kl"] for m in evals], "o-", label="eval KL")
    bottom.set_ylabel("KL to reference (nats)")
    bottom.set_xlabel("PPO iteration")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(run_dir: Path, reward: RewardClient, generator: GeneratorClient, examples: int = 8,
                 seed: int = 0) -> Path:
    metrics = _metrics(run_dir)
    trained, manifest = _trained_checkpoint(run_dir)
    config = manifest.get("config", {})
    prompts_file = run_dir / EVAL_PROMPTS
    prompts = json.loads(prompts_file.read_text())[:examples] if prompts_file.exists() else ["I watched The"]
    gen = config.get("method", {}).get("gen_kwargs", {})
    params = {"max_new_tokens": gen.get("max_new_tokens", 40), "top_k": gen.get("top_k", 0),
              "top_p": gen.get("top_p", 1.0), "do_sample": True, "seed": seed}
    base = generator.generate(prompts, checkpoint="base", **params)["completions"]
    tuned = generator.generate(prompts, checkpoint=trained, **params)["completions"]
    base_scores = reward.score([c["text"] for c in base])
    tuned_scores = reward.score([c["text"] for c in tuned])

    evals = [m for m in metrics if "eval/reward_mean" in m]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    times = [m["time"] for m in metrics if "time" in m]
    duration = (max(times) - min(times)) if times else 0.0

    def fmt(value) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"

    rows = "\n".join(
        f"| {_cell(p)} | {_cell(b['completion'])} | {bs:.3f} | {_cell(t['completion'])} | {ts:.3f} |"
        for p, b, bs, t, ts in zip(prompts, base, base_scores, tuned, tuned_scores))
    report = f"""# PPO run report: {run_dir.name}

Written {time.strftime("%Y-%m-%d %H:%M:%S")}. Trained checkpoint: `{trained}` (step {manifest.get("step")}).

## Summary

| | before (step {first.get("step", "n/a")}) | after (step {last.get("step", "n/a")}) |
|---|---|---|
| eval reward (mean) | {fmt(first.get("eval/reward_mean"))} | {fmt(last.get("eval/reward_mean"))} |
| eval KL to reference (nats) | {fmt(first.get("eval/kl"))} | {fmt(last.get("eval/kl"))} |
| eval response length (tokens) | {fmt(first.get("eval/response_length"))} | {fmt(last.get("eval/response_length"))} |
| reward of the examples below | {fmt(mean(base_scores))} | {fmt(mean(tuned_scores))} |

Training took {duration:.0f} s over {max((m["step"] for m in metrics), default=0)} PPO iterations; mixed precision:
{manifest.get("metrics", {}).get(MIXED_PRECISION_KEY, "n/a")}.

![reward and KL per step](report.png)

## Base vs trained, same prompts and seed

Completions from the generator service, scored by the reward service.

| prompt | base completion | score | trained completion | score |
|---|---|---|---|---|
{rows}

## Configuration

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```
"""
    (run_dir / "report.md").write_text(report)
    if metrics:
        plot(metrics, run_dir / "report.png")
    return run_dir / "report.md"
