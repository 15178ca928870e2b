"""The study's experiments as functions over the running services: compare a checkpoint with the base policy.

Everything goes through the generator and reward services, so a comparison measures what users of the system get.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from shared.clients import GeneratorClient, RewardClient

# Built-in prompt sets that read naturally both for the tiny corpus and for IMDB reviews.
PROMPT_SETS = {
    "positive": ["I loved this movie", "What a wonderful film", "The acting was superb and", "Highly recommended,",
                 "It is one of the best", "I enjoyed the story", "A beautiful film with", "I would happily watch"],
    "negative": ["I hated this movie", "What a terrible film", "The acting was awful and", "A waste of",
                 "It is one of the worst", "I was bored by", "A dull film with", "Half the audience left"],
    "neutral": ["I watched The", "The story follows a", "This film is", "I saw The Silent", "The movie",
                "My review of", "We went to see", "In The Golden Harbor,"],
}


def load_prompts(spec: str) -> list[str]:
    """A built-in set by name, or a file: JSONL with a `prompt` field (as `rlhf data prompts` writes) or lines."""
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--prompts takes {', '.join(PROMPT_SETS)} or a file; {spec!r} is neither")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    prompts = [json.loads(line)["prompt"] if line.lstrip().startswith("{") else line for line in lines]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


@dataclass
class Side:
    checkpoint: str
    texts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def mean_reward(self) -> float:
        return mean(self.scores)

    @property
    def positive_fraction(self) -> float:
        return sum(s > 0.5 for s in self.scores) / len(self.scores)


def _sample(generator: GeneratorClient, reward: RewardClient, checkpoint: str, prompts: list[str], samples: int,
            max_new_tokens: int, seed: int) -> Side:
    """`samples` completions per prompt, the same seeds for every checkpoint, scored by the reward service."""
    side = Side(checkpoint)
    for k in range(samples):
        body = generator.generate(prompts, checkpoint=checkpoint, max_new_tokens=max_new_tokens, seed=seed + k,
                                  top_k=0, top_p=1.0, do_sample=True)
        side.checkpoint = body["checkpoint"]
        side.texts += [c["text"] for c in body["completions"]]
    side.scores = reward.score(side.texts)
    return side


def compare(generator: GeneratorClient, reward: RewardClient, checkpoint: str, prompts: list[str], samples: int = 4,
            max_new_tokens: int = 30, seed: int = 0) -> dict:
    base = _sample(generator, reward, "base", prompts, samples, max_new_tokens, seed)
    trained = _sample(generator, reward, checkpoint, prompts, samples, max_new_tokens, seed)
    examples = [{"prompt": p, "base": b, "base_score": bs, "trained": t, "trained_score": ts}
                for p, b, bs, t, ts in zip(prompts, base.texts, base.scores, trained.texts, trained.scores)]
    return {
        "checkpoint": trained.checkpoint, "prompts": len(prompts), "samples_per_prompt": samples,
        "base": {"mean_reward": base.mean_reward, "positive_fraction": base.positive_fraction},
        "trained": {"mean_reward": trained.mean_reward, "positive_fraction": trained.positive_fraction},
        "examples": examples,
    }


def compare_markdown(result: dict) -> str:
    rows = "\n".join(f"| {e['prompt']} | {e['base'][len(e['prompt']):].strip()} | {e['base_score']:.3f} | "
                     f"{e['trained'][len(e['prompt']):].strip()} | {e['trained_score']:.3f} |"
                     for e in result["examples"])
    b, t = result["base"], result["trained"]
    return (f"# base vs {result['checkpoint']}\n\n{result['prompts']} prompts x {result['samples_per_prompt']} "
            f"samples\n\n| | base | {result['checkpoint']} |\n|---|---|---|\n"
            f"| mean reward | {b['mean_reward']:.3f} | {t['mean_reward']:.3f} |\n"
            f"| positive fraction (score > 0.5) | {b['positive_fraction']:.3f} | {t['positive_fraction']:.3f} |\n\n"
            f"| prompt | base | score | trained | score |\n|---|---|---|---|---|\n{rows}\n")


def policy_logprob(model, tokenizer, prompt: str, text: str) -> float:
    """log p(completion | prompt) under `model`, where text = prompt + completion (summed over tokens)."""
    import torch

    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
        prompt_ids = ids[:1]  # the tokenizer merged across the boundary: condition on the first token only
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()  # (T-1, V)
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # (T-1,)
    return float(logp[len(prompt_ids) - 1:].sum())


def best_string(generator: GeneratorClient, reward: RewardClient, checkpoint: str, prompts: list[str],
                budget: int = 256, max_new_tokens: int = 30, seed: int = 0, rng_seed: int = 0) -> dict:
    """The highest-scoring text the policy plausibly writes: best-of-N sampling with half the budget, then a local
    search that keeps the best strings' beginnings and resamples their endings, scored in batches."""
    import random

    rng = random.Random(rng_seed)
    pool: dict[str, tuple[str, float]] = {}  # text -> (prompt, score)

    def evaluate(pairs: list[tuple[str, str]]) -> None:
        fresh = [(p, t) for p, t in pairs if t not in pool]
        if fresh:
            for (p, t), s in zip(fresh, reward.score([t for _, t in fresh])):
                pool[t] = (p, s)

    def sample(batch_prompts: list[str], origin: list[str], batch_seed: int, tokens: int) -> list[tuple[str, str]]:
        body = generator.generate(batch_prompts, checkpoint=checkpoint, max_new_tokens=tokens, seed=batch_seed,
                                  top_k=0, top_p=1.0, do_sample=True)
        return [(o, c["text"]) for o, c in zip(origin, body["completions"])]

    first = max(1, budget // 2)
    starts = [prompts[i % len(prompts)] for i in range(first)]
    for i in range(0, first, 32):
        evaluate(sample(starts[i:i + 32], starts[i:i + 32], seed + i, max_new_tokens))
    best_sampled = max(s for _, s in pool.values())
    used, round_ = first, 0
    while used < budget:
        round_ += 1
        top = sorted(pool.items(), key=lambda kv: -kv[1][1])[:8]
        prefixes, origins = [], []
        for text, (prompt, _) in top:
            words = text[len(prompt):].split()
            keep = rng.randint(0, max(0, len(words) - 1))
            prefixes.append((prompt + " " + " ".join(words[:keep])).rstrip() if keep else prompt)
            origins.append(prompt)
        n = min(len(prefixes), budget - used)
        evaluate(sample(prefixes[:n], origins[:n], seed + 10_000 + round_, max_new_tokens))
        used += n
    ranked = sorted(pool.items(), key=lambda kv: -kv[1][1])
    return {"checkpoint": checkpoint, "budget": budget, "evaluated": len(pool), "best_sampled_score": best_sampled,
            "top": [{"text": t, "prompt": p, "score": s} for t, (p, s) in ranked[:5]]}
