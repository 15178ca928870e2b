"""Generator service throughput and latency against the in-process `model.generate` ceiling.

What it measures, per model size (`tiny`: the tiny kit's GPT-2 policy; `small`: a GPT-2-small-size model, 12
layers, dim 768, 1024 positions, random weights, built from config with the tiny tokenizer and cached in
`.cache/bench/gpt2-small`), always sampling (do_sample, temperature 1, top_k 0, top_p 1) `--max-new-tokens` tokens
from prompts made of the first 3-5 words of the held-out corpus texts:

1. ceiling: `model.generate` in this process on batches of 16 prompts (left padding, attention mask), with the
   service's torch thread count: new tokens/s;
2. service: `rlhf generator serve` started as a subprocess on a free loopback port (max batch size 16), loaded by a
   load generator in ANOTHER process (this script re-run as `_loadgen`: httpx + asyncio, N clients, each in a
   closed loop, one prompt per request) at concurrency 1, 4 and 16: new tokens/s and p50/p99 latency as the client
   sees it.

Tokens are the ones actually generated: EOS ends a sequence early (the service has no `min_new_tokens`), so both
sides count the new tokens before the first EOS (the service reports them as each completion's `tokens`), never
`max_new_tokens` and never the padding a batch adds after a row's EOS.

From these: `ratio_to_ceiling` = service at concurrency 16 / ceiling (and per concurrency, in each service entry),
and `target_met` = ratio >= 0.9 (the target is about `small`; for `tiny` HTTP and Python overhead dominate and the
ratio says little). `lone_generate_ms` is one in-process `generate` call on one prompt (the median of several) and
`p50_vs_lone` the service's p50 latency at concurrency 1 over it; `latency_target_met` = p50_vs_lone <= 1.1.

`ttft_ms` per concurrency is the service's own mean time to first token over the window (its
`generator_time_to_first_token_seconds` histogram): from a prompt's arrival in the queue to its first new token, so
it leaves out HTTP (about a millisecond on loopback) but sees queueing and prefill. With `--mode static` the tokens
of a batched request all appear when its generate call returns, and that is what it reports there.

One request of `small` at batch 16 takes several seconds, so a fixed window would cut through requests and count
whole batches in or out (an error of up to one batch per window). Instead each simulated user counts only whole
requests: those it sent after the warm-up and that finished before the window closed, over the time from the first
one's send to the last one's answer; the service's rate is the sum over users. The window stays open past
`--duration` until every user has at least one such request.

Each measurement also reports the service's mean batch size (from /metrics: sequences per decode step with
continuous batching, per generate call with static), its CPU use and the load generator's CPU use (from /proc), so a
low number can be told apart from a saturated load generator or a busy machine.

`--mode` picks the service's batching (`continuous`, its default, or `static`: one generate call per batch).

Run (from the repo root; with the defaults, 60 s per point, each size takes about 6 minutes on 2 cores; add
`--duration 5` for a smoke run):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generator.py --sizes tiny,small [--duration 60] [--threads 1] \
        [--max-new-tokens 40] [--mode continuous|static] [--max-wait-ms 5] [--out result.json]

Progress goes to stderr; the last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: find common.py next to us

import common  # noqa: E402
from common import log, percentile, rounded  # noqa: E402

CONCURRENCIES = (1, 4, 16)
BATCH_SIZE = 16  # the ceiling's batch and the service's max batch size
TARGET_RATIO = 0.9
TARGET_LATENCY = 1.1  # p50 at one client over one lone generate call
BATCH_HISTOGRAM = "generator_batch_size"  # sequences per decode step (static: per generate call), on /metrics
TTFT_HISTOGRAM = "generator_time_to_first_token_seconds"
LONE_CALLS = 7  # in-process generate calls of one prompt for `lone_generate_ms` (the median)


def sampling(max_new_tokens: int) -> dict:
    """The sampling parameters both sides use; every knob explicit (a generation_config may carry top_k 50)."""
    return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


# -- load generator (runs in its own process) -----------------------------------------------------------------------

@dataclass
class Window:
    """The measured window of one closed loop, shared by its clients (all in one event loop, so no locks)."""

    start: float  # requests sent before this are warm-up
    min_end: float  # the window closes at the first moment after this when every client has a counted request
    hard_end: float  # ... or here, whatever the clients have, so one stuck request cannot hang the benchmark
    counted: list[int]  # per client: requests sent after `start` that have finished
    end: float | None = None  # set once: requests finished after it do not count, and no client sends again
    edges: list[dict] = field(default_factory=list)  # snapshots at start and end


async def close_window(window: Window, probe, service_pid: int) -> None:
    """Snapshot at the start, then close the window as soon as it may close, and snapshot again."""
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    window.edges.append(await common.snapshot_histograms(probe, service_pid, (BATCH_HISTOGRAM, TTFT_HISTOGRAM)))
    await asyncio.sleep(max(0.0, window.min_end - time.perf_counter()))
    while min(window.counted) < 1 and time.perf_counter() < window.hard_end:
        await asyncio.sleep(0.02)
    window.end = time.perf_counter()
    window.edges.append(await common.snapshot_histograms(probe, service_pid, (BATCH_HISTOGRAM, TTFT_HISTOGRAM)))


async def client_loop(client, prompts: list[str], first: int, step: int, body: dict, window: Window,
                      k: int) -> list[tuple]:
    """User k: send one prompt, wait for the answer, send the next, until the window closes.

    Returns (sent, finished, status, tokens, stopped early) per request; the request in flight when the window
    closes is still awaited (so no abandoned work spills into the next measurement) and filtered out later.
    """
    import httpx

    done, i = [], first
    while window.end is None:
        prompt = prompts[i % len(prompts)]
        i += step  # clients take interleaved prompts, so the mix of lengths is the corpus's mix
        sent = time.perf_counter()
        tokens, stopped = 0, 0
        try:
            r = await client.post("/v1/generate", json={**body, "prompts": [prompt]})
            status = r.status_code
            if status == 200:
                completions = r.json()["completions"]
                tokens = sum(c["tokens"] for c in completions)
                stopped = sum(c["finish_reason"] == "stop" for c in completions)
        except httpx.HTTPError:
            status = 0
        finished = time.perf_counter()
        done.append((sent, finished, status, tokens, stopped))
        if sent >= window.start and window.end is None:
            window.counted[k] += 1
    return done


async def closed_loop(url: str, prompts: list[str], concurrency: int, warmup: float, duration: float,
                      max_new_tokens: int, service_pid: int) -> dict:
    """`concurrency` clients, each sending one prompt per request and the next as soon as the answer comes."""
    body = {"checkpoint": "base", "seed": None, "num_return_sequences": 1, **sampling(max_new_tokens)}
    async with contextlib.AsyncExitStack() as stack:
        clients, probe = await common.open_clients(stack, url, concurrency, timeout=600, probe_timeout=60)
        now = time.perf_counter()  # the clock starts once the clients exist
        window = Window(start=now + warmup, min_end=now + warmup + duration,
                        hard_end=now + warmup + 4 * duration + 120, counted=[0] * concurrency)
        closer = asyncio.create_task(close_window(window, probe, service_pid))
        done = await asyncio.gather(*(client_loop(client, prompts, k, concurrency, body, window, k)
                                      for k, client in enumerate(clients)))
        await closer
    return summarize(done, window)


def summarize(done: list[list[tuple]], window: Window) -> dict:
    """Per-user whole-request rates, summed; latency over every counted request; the rest from the snapshots."""
    rate, ok, errors, idle_clients = 0.0, [], 0, 0
    for per_client in done:
        inside = [d for d in per_client if d[0] >= window.start and d[1] <= window.end]
        good = [d for d in inside if d[2] == 200]
        errors += len(inside) - len(good)
        ok += good
        if not good:
            idle_clients += 1  # only when the hard end cut the window: this user adds nothing to the rate
            continue
        # A closed loop: this user's requests ran back to back from its first send to its last answer.
        rate += sum(d[3] for d in good) / (max(d[1] for d in good) - min(d[0] for d in good))
    latencies = sorted((d[1] - d[0]) * 1000 for d in ok)
    first, last = window.edges
    tokens = sum(d[3] for d in ok)
    return {
        "tokens_per_s": rounded(rate, 1),
        "p50_ms": rounded(percentile(latencies, 0.50), 1),
        "p99_ms": rounded(percentile(latencies, 0.99), 1),
        "requests": len(ok),
        "errors": errors,
        "clients_without_requests": idle_clients,
        "window_s": rounded(window.end - window.start, 1),
        "mean_tokens": rounded(tokens / len(ok)) if ok else float("nan"),  # below max_new_tokens: EOS came first
        "stop_fraction": rounded(sum(d[4] for d in ok) / len(ok), 3) if ok else float("nan"),
        "mean_batch_size": common.mean_batch_size(first, last, BATCH_HISTOGRAM),
        "ttft_ms": rounded(common.histogram_mean(first, last, TTFT_HISTOGRAM) * 1000, 1),
        **common.cpu_cores(first, last),
    }


def loadgen_main(argv: list[str]) -> None:
    p = common.loadgen_parser("generator.py")
    p.add_argument("--prompts", required=True, type=Path, help="JSON list of prompts")
    p.add_argument("--max-new-tokens", type=int, required=True)
    a = p.parse_args(argv)
    prompts = json.loads(a.prompts.read_text())
    result = asyncio.run(closed_loop(a.url, prompts, a.concurrency, a.warmup, a.duration, a.max_new_tokens,
                                     a.service_pid))
    print(json.dumps(result))


# -- the service under test -----------------------------------------------------------------------------------------

def generator_service(model_dir: Path, work: Path, tag: str, args):
    """The generator service serving `model_dir` in a subprocess (see common.running_service)."""
    # max_wait_ms has no flag, so batching goes in a config file; the rest on the command line.
    config = {
        "batching": {"mode": args.mode, "max_batch_size": BATCH_SIZE, "max_wait_ms": args.max_wait_ms},
        "log_level": args.service_log_level,  # "info" would add an access-log line per request to what is measured
    }
    flags = ["--model", str(model_dir), "--device", "cpu"]
    # A graceful shutdown finishes the batch in flight (seconds for `small`), hence the longer wait before SIGKILL.
    return common.running_service("generator", config, flags, work, tag, threads=args.threads, stop_timeout=30)


def check_service(url: str, prompt: str, max_new_tokens: int) -> None:
    """One request before measuring: fails early and clearly if generation is broken, and warms the model."""
    import httpx

    body = {"prompts": [prompt], "checkpoint": "base", **sampling(max_new_tokens)}
    r = httpx.post(f"{url}/v1/generate", json=body, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/generate answered {r.status_code}: {r.text[:500]}")


def run_load(url: str, service_pid: int, prompts_file: Path, concurrency: int, args) -> dict:
    """One closed-loop measurement by the load generator process (see common.run_loadgen)."""
    options = {"url": url, "prompts": prompts_file, "concurrency": concurrency, "warmup": args.warmup,
               "duration": args.duration, "max_new_tokens": args.max_new_tokens, "service_pid": service_pid}
    # A window may stay open past --duration (until every user has a whole request in it).
    return common.run_loadgen(__file__, options, timeout=args.warmup + 5 * args.duration + 600)


def measure_service(model_dir: Path, name: str, work: Path, prompts: list[str], prompts_file: Path, args) -> dict:
    results = {}
    with generator_service(model_dir, work, name, args) as (url, proc):
        check_service(url, prompts[0], args.max_new_tokens)
        for c in CONCURRENCIES:
            r = run_load(url, proc.pid, prompts_file, c, args)
            log(f"  {name} service concurrency={c}: {r['tokens_per_s']} tokens/s, p50 {r['p50_ms']} ms, "
                f"p99 {r['p99_ms']} ms, ttft {r['ttft_ms']} ms, {r['requests']} requests in {r['window_s']} s, "
                f"batch {r['mean_batch_size']}, "
                f"service {r['service_cpu_cores']} cores, loadgen {r['loadgen_cpu_cores']} cores, "
                f"errors {r['errors']}")
            results[str(c)] = r
    return results


# -- in-process ceiling ---------------------------------------------------------------------------------------------

def load_policy(model_dir: Path):
    """Tokenizer and model as the service loads them: pad = EOS when unset, left padding, eval mode, CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues from the right end of every row
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to("cpu").eval()
    return tok, model


def real_tokens(new_ids: list[int], eos: int) -> int:
    """New tokens before the first EOS: what the service reports as `tokens` (the EOS and padding not counted)."""
    return new_ids.index(eos) if eos in new_ids else len(new_ids)


def generate_batch(tok, model, prompts: list[str], max_new_tokens: int) -> list[int]:
    """One `model.generate` call on these prompts, as the service makes it; real new tokens per prompt."""
    import torch  # here, not at the top: the load generator process never needs it

    enc = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt")  # (B, T), left-padded
    with torch.inference_mode():
        out = model.generate(**enc, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             **sampling(max_new_tokens))  # (B, T + new)
    return [real_tokens(row, tok.eos_token_id) for row in out[:, enc["input_ids"].shape[1]:].tolist()]


def measure_lone(tok, model, prompts: list[str], max_new_tokens: int) -> float:
    """Median milliseconds of one in-process `generate` call on one prompt: what a lone request costs the model."""
    times = []
    for i in range(LONE_CALLS):
        started = time.perf_counter()
        generate_batch(tok, model, [prompts[i % len(prompts)]], max_new_tokens)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure_ceiling(model_dir: Path, prompts: list[str], max_new_tokens: int, duration: float) -> dict:
    """Tokens/s of back-to-back `model.generate` calls on batches of BATCH_SIZE prompts (at least 2 calls)."""
    tok, model = load_policy(model_dir)
    batches = ([prompts[(i + k) % len(prompts)] for k in range(BATCH_SIZE)] for i in itertools.count(0, BATCH_SIZE))
    generate_batch(tok, model, next(batches), max_new_tokens)  # warm up: the first call allocates, picks kernels
    counts, start = [], time.perf_counter()
    while time.perf_counter() - start < duration or len(counts) < 2 * BATCH_SIZE:
        counts += generate_batch(tok, model, next(batches), max_new_tokens)
    elapsed = time.perf_counter() - start
    calls = len(counts) // BATCH_SIZE
    lone = measure_lone(tok, model, prompts, max_new_tokens)
    return {"tokens_per_s": rounded(sum(counts) / elapsed, 1), "calls": calls,
            "lone_generate_ms": rounded(lone, 1),
            "seconds_per_call": rounded(elapsed / calls), "mean_tokens": rounded(statistics.fmean(counts)),
            "stop_fraction": rounded(sum(c < max_new_tokens for c in counts) / len(counts), 3)}


# -- models and prompts ---------------------------------------------------------------------------------------------

def read_prompts(tiny: Path) -> list[str]:
    """The first 3, 4 or 5 words (in turn) of each held-out text: short prompts, as in RLHF rollouts."""
    return [" ".join(text.split()[: 3 + i % 3]) for i, text in enumerate(common.heldout_texts(tiny))]


def model_facts(model_dir: Path, prompts: list[str]) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    counts = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    prompt_tokens = {"mean_prompt_tokens": rounded(statistics.fmean(counts)), "max_prompt_tokens": max(counts)}
    return common.gpt2_facts(model_dir) | prompt_tokens


# -- one size, end to end -------------------------------------------------------------------------------------------

def bench_size(name: str, model_dir: Path, prompts: list[str], prompts_file: Path, work: Path, args) -> dict:
    result = model_facts(model_dir, prompts)
    log(f"{name}: {result['layers']} layers, dim {result['dim']}, {result['params_millions']} M parameters, "
        f"mean {result['mean_prompt_tokens']} prompt tokens")
    # The ceiling first, while nothing else runs; its model is freed before the service starts.
    ceiling = measure_ceiling(model_dir, prompts, args.max_new_tokens, args.duration)
    gc.collect()  # its model, before the service loads its own copy
    log(f"{name}: ceiling {ceiling['tokens_per_s']} tokens/s (batch {BATCH_SIZE}, {ceiling['calls']} calls of "
        f"{ceiling['seconds_per_call']} s, {ceiling['mean_tokens']} tokens per sequence)")
    result["ceiling_tokens_per_s"] = ceiling["tokens_per_s"]
    result["ceiling"] = ceiling
    result["lone_generate_ms"] = ceiling["lone_generate_ms"]
    result["service"] = measure_service(model_dir, name, work, prompts, prompts_file, args)
    for r in result["service"].values():
        r["ratio_to_ceiling"] = rounded(r["tokens_per_s"] / ceiling["tokens_per_s"], 3)
    ratio = result["service"][str(CONCURRENCIES[-1])]["tokens_per_s"] / ceiling["tokens_per_s"]
    result["ratio_to_ceiling"] = rounded(ratio, 3)
    result["target_met"] = ratio >= TARGET_RATIO
    p50_vs_lone = result["service"][str(CONCURRENCIES[0])]["p50_ms"] / ceiling["lone_generate_ms"]
    result["p50_vs_lone"] = rounded(p50_vs_lone, 3)
    result["latency_target_met"] = p50_vs_lone <= TARGET_LATENCY
    log(f"{name}: service at concurrency {CONCURRENCIES[-1]} / ceiling = {result['ratio_to_ceiling']}; p50 at "
        f"concurrency {CONCURRENCIES[0]} / lone generate ({ceiling['lone_generate_ms']} ms) = {result['p50_vs_lone']}")
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds measured per load level and for the ceiling (a window stays open until every "
                        "client has one whole request in it)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measured window")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the service and the ceiling (1 leaves a core to the load generator)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--mode", choices=("continuous", "static"), default="continuous", help="the service's batching")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="static batching's wait (the service's default: 50)")
    p.add_argument("--service-log-level", default="warning", help="the service's log level (info logs each request)")
    common.add_output_options(p)
    args = p.parse_args(argv)
    args.sizes = common.split_sizes(p, args.sizes, ("tiny", "small"))
    if args.duration <= 0 or args.warmup < 0 or args.threads < 1 or args.max_new_tokens < 1:
        p.error("--duration and --max-new-tokens must be positive, --warmup >= 0, --threads >= 1")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    common.prepare_process(args.threads)
    started = time.perf_counter()
    settings = {"max_new_tokens": args.max_new_tokens, "batch_size": BATCH_SIZE, "mode": args.mode,
                "max_wait_ms": args.max_wait_ms,
                "duration_s": args.duration, "warmup_s": args.warmup}
    report = common.report_header(args.threads, settings)
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-generator-"))
    try:
        tiny = common.tiny_dir(args.tiny_dir, ("tiny-gpt2", "corpus/heldout.jsonl"))
        prompts = read_prompts(tiny)
        prompts_file = work / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        for size in args.sizes:
            model_dir = tiny / "tiny-gpt2" if size == "tiny" else common.small_gpt2(tiny / "tiny-gpt2")
            report[size] = bench_size(size, model_dir, prompts, prompts_file, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "small" in report:  # the targets are about the small size
        report["target_met"] = report["small"]["target_met"]
        report["latency_target_met"] = report["small"]["latency_target_met"]
    common.print_report(report, started, args.out)


if __name__ == "__main__":
    common.main_or_loadgen(main, loadgen_main)
