"""The continuous-batching scheduler in-process with the tiny policy: rows join a running batch, leave it, stay
correct and isolated. Behaviour only (what finishes first, which tokens), never wall time."""

from __future__ import annotations

import asyncio

import pytest
import torch

import services.generator.scheduler as scheduler_module
from services.generator.checkpoints import load_policy
from services.generator.engine import (
    GenerationItem,
    NonFiniteOutputError,
    generate_batch,
    new_request_id,
    sampling_params,
    tokenize_prompts,
)
from services.generator.scheduler import Scheduler

pytestmark = pytest.mark.slow

PROMPTS = ["I watched The", "The story follows a young", "This", "We went to see The Silent Harbor at the"]


@pytest.fixture(scope="module")
def policy(tiny_kit):
    torch.set_num_threads(1)
    return load_policy("base", str(tiny_kit / "tiny-gpt2"), "cpu")


@pytest.fixture(scope="module")
def other(tiny_kit):
    """A second checkpoint: the tiny policy with its weights nudged, so its greedy text differs."""
    p = load_policy("run/step-1", str(tiny_kit / "tiny-gpt2"), "cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in p.model.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * 0.3)
    return p


def scheduler(**kw) -> Scheduler:
    return Scheduler(**{"max_batch_size": 16, "max_batch_tokens": 65536, "max_queue_size": 256,
                        "join_wait_steps": 2, **kw})


def items(policy, prompts: list[str], max_new_tokens: int = 16, greedy: bool = True, seed: int | None = None,
          n: int = 1, **extra) -> list[GenerationItem]:
    params = sampling_params(max_new_tokens, 1.0, 1.0, 0, seed, n, (), do_sample=not greedy, **extra)
    rid = new_request_id()
    return [GenerationItem(policy, p, ids, params, rid) for p, ids in zip(prompts, tokenize_prompts(policy, prompts))]


def in_process(policy, prompt: str, max_new_tokens: int) -> str:
    """Greedy `model.generate` on the prompt alone, cut at EOS, as text (some tokens do not survive re-encoding)."""
    ids = policy.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = policy.model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=policy.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    eos = policy.tokenizer.eos_token_id
    return policy.tokenizer.decode(out[: out.index(eos)] if eos in out else out, skip_special_tokens=True)


async def after_steps(s: Scheduler, steps: int) -> None:
    """Wait until the scheduler has run `steps` more decode steps (behaviour, not a clock)."""
    target = s.steps + steps
    while s.steps < target:
        await asyncio.sleep(0.001)


def test_a_request_joining_mid_flight_finishes_before_the_long_one(policy):
    async def main():
        s = scheduler()
        long = asyncio.ensure_future(s.submit(items(policy, ["I watched The"], 120, min_tokens=120)))
        await after_steps(s, 5)
        short, _ = await s.submit(items(policy, ["This"], 4, min_tokens=4))
        assert not long.done()  # served within the running batch, not after it
        assert short[0][0].tokens == 4
        done, _ = await long
        await s.close()
        return done

    assert asyncio.run(main())[0][0].tokens == 120


def test_greedy_equals_in_process_generate_for_rows_joining_at_different_steps(policy):
    async def main():
        s = scheduler()

        async def one(k: int, prompt: str):
            await after_steps(s, 3 * k) if k else None
            results, _ = await s.submit(items(policy, [prompt], 20))
            return results[0][0]

        out = await asyncio.gather(*(one(k, p) for k, p in enumerate(PROMPTS * 2)))
        await s.close()
        return out

    for prompt, c in zip(PROMPTS * 2, asyncio.run(main())):
        assert c.completion == in_process(policy, prompt, 20), prompt


def test_logprobs_penalties_and_bias_equal_the_static_path(policy):
    extra = {"logprobs": 2, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "logit_bias": ((13, 2.0),),
             "min_tokens": 5, "prompt_logprobs": True}
    static = generate_batch(items(policy, PROMPTS[:2], 12, **extra))

    async def main():
        s = scheduler()
        noise = asyncio.ensure_future(s.submit(items(policy, PROMPTS, 30, greedy=False)))  # other rows around
        await after_steps(s, 2)
        mine, _ = await s.submit(items(policy, PROMPTS[:2], 12, **extra))
        await noise
        await s.close()
        return mine

    for a, b in zip(static, asyncio.run(main())):
        assert a[0].completion == b[0].completion and a[0].finish_reason == b[0].finish_reason
        assert [t.token for t in a[0].logprobs] == [t.token for t in b[0].logprobs]
        assert [t.logprob for t in a[0].logprobs] == pytest.approx([t.logprob for t in b[0].logprobs], abs=1e-4)
        assert [t.token for t in a[0].prompt_logprobs] == [t.token for t in b[0].prompt_logprobs]


def test_seeded_requests_repeat_amid_concurrent_unseeded_traffic(policy):
    async def run(noise: int):
        s = scheduler()
        others = [asyncio.ensure_future(s.submit(items(policy, PROMPTS, 16, greedy=False))) for _ in range(noise)]
        await asyncio.sleep(0) if noise else None
        seeded, _ = await s.submit(items(policy, PROMPTS, 16, greedy=False, seed=7, n=2))
        await asyncio.gather(*others)
        await s.close()
        return [[c.completion for c in per_prompt] for per_prompt in seeded]

    alone = asyncio.run(run(0))
    assert asyncio.run(run(3)) == alone
    assert len({c for per_prompt in alone for c in per_prompt}) > 1  # sampled, not all the same


def test_two_checkpoints_are_served_each_by_its_own_weights(policy, other):
    async def main():
        s = scheduler()
        jobs = [s.submit(items(p, [prompt], 12)) for prompt in PROMPTS for p in (policy, other)]
        out = await asyncio.gather(*jobs)
        await s.close()
        return out

    results = asyncio.run(main())
    for (prompt, p), (r, _) in zip([(prompt, p) for prompt in PROMPTS for p in (policy, other)], results):
        assert r[0][0].completion == in_process(p, prompt, 12)
    assert any(a[0][0][0].completion != b[0][0][0].completion for a, b in zip(results[::2], results[1::2]))


def test_a_checkpoint_is_not_starved_by_steady_traffic_for_another(policy, other):
    async def main():
        s = scheduler()

        async def busy_client(k: int):  # never lets the base batch run dry on its own
            for i in range(8):
                await s.submit(items(policy, [PROMPTS[(i + k) % 4]], 12, greedy=False))

        clients = [asyncio.ensure_future(busy_client(k)) for k in range(6)]
        await after_steps(s, 4)
        served, _ = await s.submit(items(other, ["This"], 6))
        busy = sum(not c.done() for c in clients)
        await asyncio.gather(*clients)
        await s.close()
        return served, busy

    served, busy = asyncio.run(main())
    assert served[0][0].completion == in_process(other, "This", 6)
    assert busy > 0  # served while the other checkpoint's traffic was still going, not after it


def test_a_cancelled_request_frees_its_slot(policy):
    async def main():
        s = scheduler(max_batch_size=1)
        long = asyncio.ensure_future(s.submit(items(policy, ["I watched The"], 300, min_tokens=300)))
        await after_steps(s, 3)
        long.cancel()
        short, _ = await s.submit(items(policy, ["This"], 3, min_tokens=3))
        steps = s.steps
        await s.close()
        return short, steps

    short, steps = asyncio.run(main())
    assert short[0][0].tokens == 3 and steps < 50  # the one slot went to it long before 300 steps


def test_a_failing_row_fails_alone(policy, monkeypatch):
    real = scheduler_module.adjust_scores

    def flaky(params, *args):
        if params.min_tokens == 3:
            raise RuntimeError("injected row fault")
        return real(params, *args)

    monkeypatch.setattr(scheduler_module, "adjust_scores", flaky)

    async def main():
        s = scheduler()
        good = [s.submit(items(policy, [p], 10)) for p in PROMPTS]
        bad = s.submit(items(policy, ["This"], 10, min_tokens=3))
        out = await asyncio.gather(*good, bad, return_exceptions=True)
        after, _ = await s.submit(items(policy, ["This"], 10))
        await s.close()
        return out, after

    out, after = asyncio.run(main())
    assert isinstance(out[-1], RuntimeError) and "injected row fault" in str(out[-1])
    for prompt, (r, _) in zip(PROMPTS, out[:-1]):
        assert r[0][0].completion == in_process(policy, prompt, 10)
    assert after[0][0].completion == in_process(policy, "This", 10)


def test_non_finite_rows_fail_and_the_scheduler_goes_on(policy, monkeypatch):
    broken = load_policy("nan/step-1", str(policy.model.name_or_path), "cpu")
    with torch.no_grad():
        broken.model.transformer.ln_f.weight.fill_(float("nan"))

    async def main():
        s = scheduler()
        bad = await asyncio.gather(s.submit(items(broken, ["This"], 5)), return_exceptions=True)
        good, _ = await s.submit(items(policy, ["This"], 5))
        await s.close()
        return bad[0], good

    bad, good = asyncio.run(main())
    assert isinstance(bad, NonFiniteOutputError)
    assert good[0][0].completion == in_process(policy, "This", 5)


def test_streamed_tokens_come_from_the_running_batch(policy):
    async def main():
        s = scheduler()
        seen: list[int] = []
        batched = asyncio.ensure_future(s.submit(items(policy, PROMPTS, 20)))
        await s.stream(items(policy, ["I watched The"], 20)[0], lambda token, info: seen.append(token), lambda: False)
        await batched
        await s.close()
        return seen

    seen = asyncio.run(main())
    assert policy.tokenizer.decode(seen, skip_special_tokens=True) == in_process(policy, "I watched The", 20)
