"""Reward service throughput and latency against the in-process ceiling.

What it measures, per model size (`tiny`: the tiny kit's sentiment classifier; `base`: a DistilBERT-base-size
classifier with random weights, 6 layers, dim 768, built from config and saved next to the tiny tokenizer):

1. ceiling: `transformers.pipeline("text-classification", batch_size=B)` in this process, texts/s over the
   held-out reviews, with B = the service's max batch size and the service's torch thread count and dtype;
2. forward_ms_single: one forward pass on one (already tokenized) text, in this process, median of many;
3. service: `rlhf reward serve` started as a subprocess on a free loopback port, loaded by a load generator in
   ANOTHER process (this script re-run as `_loadgen`: httpx + asyncio, N clients, each in a closed loop, one text
   per request), at concurrency 1, 8 and 64: texts/s and p50/p99 latency as the client sees it;
4. unbatched: the same with `--max-batch-size 1`.

From these it derives the issue's targets (they are about the base size): service at concurrency 64 >= 0.85 x
ceiling, >= 4x the unbatched service at 64, and p50 at concurrency 1 within 10 ms of one forward pass.

Part `replicas` (the tiny kit's sentiment classifier): scoring throughput of `RewardClient` (shared/clients.py)
against 1 and then 2 replicas (two `rlhf reward serve` subprocesses, same settings, started once; the second idles
while the first is measured alone). `--replica-callers` threads share one client and call `score()` on
`--replica-call-texts` texts at a time in a closed loop; each call is split into requests of `--max-batch-size`
texts, at most 2 per replica in flight per call, so every replica has the same requests in flight in both runs.
texts/s counts the requests answered inside the window (the client's own per-replica counters). Target: 2 replicas
>= 1.7x 1 replica. Also reported: each replica's share of the requests and CPU use, and the client's CPU use.
Measured twice: `shared` (the replicas may use every core, as the processes come) and `one_core_each` (each replica
pinned to a core of its own, every thread of it, as a container with `cpus: 1` would be; the client is not
pinned). One replica alone uses a little more than one core (event loop and torch thread), so on a 2-core machine
`shared` cannot reach 2x: the machine, not the client, is then the limit.

Part `backends` (the base size): for each reward backend (`--backends`, default torch:float32, torch:bfloat16,
onnx:float32, onnx:int8) the in-process ceiling (the service's own Scorer, `--max-batch-size` texts per batch,
tokenizing included) and the service's texts/s at 64 clients (the model's `backend` and `dtype` in its config).
`best_backend_vs_fp32_ceiling` = the best backend's service texts/s at 64 clients / the float32 torch pipeline
ceiling (as in part sizes); `best_backend_vs_fp32_scorer_ceiling` the same against the float32 Scorer ceiling. ONNX
graphs are exported (and int8 quantized) once, before anything is timed. Target: >= 3.

Part `ceiling` (the base size, in-process only; with `--device cuda` it imports no web stack): each backend's
Scorer ceiling at `--max-batch-size` and at batch 1, `batching_speedup` = batched / batch-1 texts/s, and the GPU's
name. Its default backends: torch:float32 and torch:float16 (sdpa attention) on cuda, as part backends on a CPU.

Each load measurement also reports where the time went: the service's mean batch size, queue and inference time
(from its response headers and /metrics), the service's CPU ms per text and the load generator's CPU use (read
from /proc), so a low number can be told apart from a saturated load generator.

Run (from the repo root; about 3 minutes on 2 cores with the defaults, tiny kit already built; `--parts
replicas` alone about a minute):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/reward.py [--parts sizes,replicas] --sizes tiny,base [--duration 6] \
        [--threads 1] [--dtype float32|bfloat16] [--max-batch-size 32] [--max-wait-ms 2] [--out result.json]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/reward.py --parts backends [--backends onnx:int8,torch:float32]
    HF_HUB_OFFLINE=1 python bench/reward.py --parts ceiling --device cuda

Progress goes to stderr; the last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: find common.py next to us

import common  # noqa: E402
from common import log, percentile, rounded  # noqa: E402

CONCURRENCIES = (1, 8, 64)
MODEL_NAME = "m"
TARGETS = {"ratio_to_ceiling": 0.85, "speedup_vs_unbatched": 4.0, "p50_c1_minus_forward_ms": 10.0}
BATCH_HISTOGRAM = "reward_batch_size"  # texts per batch, on the service's /metrics


# -- load generator (runs in its own process) -----------------------------------------------------------------------

async def closed_loop(url: str, texts: list[str], concurrency: int, warmup: float, duration: float,
                      service_pid: int) -> dict:
    """`concurrency` clients, each sending one text per request and the next as soon as the answer comes.

    The clients run without a break through warmup and window so the window sees a steady state; only requests
    that finish inside the window count. After the window each client finishes its request in flight (so no
    abandoned work spills into the next measurement) without counting it.
    """
    async with contextlib.AsyncExitStack() as stack:
        clients, probe = await common.open_clients(stack, url, concurrency, timeout=120, probe_timeout=30)
        # The clock starts once the clients exist: creating 64 of them takes a good part of a second.
        window_start = time.perf_counter() + warmup
        window = (window_start, window_start + duration)
        edge_task = asyncio.create_task(edges(probe, window, service_pid))
        done = await asyncio.gather(*(client_loop(client, texts, k, concurrency, window[1])
                                      for k, client in enumerate(clients)))
        first, last = await edge_task
    return summarize([d for per_client in done for d in per_client], window, first, last)


async def client_loop(client, texts: list[str], first: int, step: int, stop_at: float) -> list[tuple]:
    """One user: send, wait for the answer, send the next, until `stop_at`.

    Returns (finished, latency s, status, inference ms, queue ms) per request.
    """
    import httpx

    done, i = [], first
    while time.perf_counter() < stop_at:
        text = texts[i % len(texts)]
        i += step  # clients take interleaved texts, so the mix of lengths is the corpus's mix
        sent = time.perf_counter()
        try:
            r = await client.post("/v1/score", json={"texts": [text]})
            status, headers = r.status_code, r.headers
        except httpx.HTTPError:
            status, headers = 0, {}
        finished = time.perf_counter()
        done.append((finished, finished - sent, status, float(headers.get("x-inference-time", "nan")),
                     float(headers.get("x-queue-time", "nan"))))
    return done


async def edges(probe, window: tuple[float, float], service_pid: int) -> tuple[dict, dict]:
    """Snapshots at the start and end of the window (for CPU use and batch statistics)."""
    await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
    first = await common.snapshot(probe, service_pid, BATCH_HISTOGRAM)
    await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
    return first, await common.snapshot(probe, service_pid, BATCH_HISTOGRAM)


def summarize(done: list[tuple], window: tuple[float, float], first: dict, last: dict) -> dict:
    """Throughput and latency over the requests that finished inside the window; the rest from the snapshots."""
    inside = [d for d in done if window[0] <= d[0] <= window[1]]
    ok = [d for d in inside if d[2] == 200]
    latencies = sorted(d[1] * 1000 for d in ok)
    # The snapshots can be a little late (a busy event loop); CPU is divided by what finished between them.
    between = sum(1 for d in done if first["t"] <= d[0] <= last["t"] and d[2] == 200)
    service_cpu = last["service_cpu"] - first["service_cpu"]
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return {
        "texts_per_s": rounded(len(ok) / (window[1] - window[0]), 1),
        "p50_ms": rounded(percentile(latencies, 0.50)),
        "p99_ms": rounded(percentile(latencies, 0.99)),
        "requests": len(ok),
        "errors": len(inside) - len(ok),
        "mean_batch_size": common.mean_batch_size(first, last, BATCH_HISTOGRAM),
        "mean_inference_ms": rounded(mean([d[3] for d in ok])),  # time inside the batch's forward, per request
        "mean_queue_ms": rounded(mean([d[4] for d in ok])),  # time waiting for a batch to start
        "service_cpu_ms_per_text": rounded(service_cpu * 1000 / between) if between else float("nan"),
        **common.cpu_cores(first, last),
    }


def loadgen_main(argv: list[str]) -> None:
    p = common.loadgen_parser("reward.py")
    p.add_argument("--texts", required=True, type=Path, help="JSON list of texts")
    a = p.parse_args(argv)
    texts = json.loads(a.texts.read_text())
    result = asyncio.run(closed_loop(a.url, texts, a.concurrency, a.warmup, a.duration, a.service_pid))
    print(json.dumps(result))


# -- the service under test -----------------------------------------------------------------------------------------

def reward_service(model_dir: Path, work: Path, tag: str, *, threads: int, dtype: str, max_batch_size: int,
                   max_wait_ms: float, log_level: str, backend: str = "torch"):
    """The reward service serving `model_dir` in a subprocess (see common.running_service)."""
    # dtype and backend are per model, so they are set in a config file; the rest goes on the command line.
    config = {
        "models": [{"name": MODEL_NAME, "source": str(model_dir), "dtype": dtype, "backend": backend}],
        "device": "cpu",
        "log_level": log_level,  # "info" would add an access-log line per request to what is measured
    }
    flags = ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)]
    return common.running_service("reward", config, flags, work, tag, threads=threads, stop_timeout=15)


def run_load(url: str, service_pid: int, texts_file: Path, concurrency: int, warmup: float,
             duration: float) -> dict:
    """One closed-loop measurement by the load generator process (see common.run_loadgen)."""
    options = {"url": url, "texts": texts_file, "concurrency": concurrency, "warmup": warmup,
               "duration": duration, "service_pid": service_pid}
    return common.run_loadgen(__file__, options, timeout=warmup + duration + 300)


def measure_service(model_dir: Path, work: Path, texts_file: Path, args, batch_size: int) -> dict:
    tag = f"{model_dir.name}-b{batch_size}"
    results = {}
    with reward_service(model_dir, work, tag, threads=args.threads, dtype=args.dtype, max_batch_size=batch_size,
                        max_wait_ms=args.max_wait_ms, log_level=args.service_log_level) as (url, proc):
        for c in CONCURRENCIES:
            r = run_load(url, proc.pid, texts_file, c, args.warmup, args.duration)
            log(f"  max_batch_size={batch_size} concurrency={c}: {r['texts_per_s']} texts/s, p50 {r['p50_ms']} ms, "
                f"p99 {r['p99_ms']} ms, batch {r['mean_batch_size']}, service {r['service_cpu_cores']} cores, "
                f"loadgen {r['loadgen_cpu_cores']} cores, errors {r['errors']}")
            results[str(c)] = r
    return results


# -- in-process measurements ----------------------------------------------------------------------------------------

def precision(dtype: str):
    """What the service does for a non-float32 dtype: autocast around the forward pass."""
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


def measure_ceiling(model_dir: Path, texts: list[str], batch_size: int, dtype: str, duration: float) -> float:
    """texts/s of the HF pipeline, batched, over the corpus texts in order (it tokenizes and pads as it goes)."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(model_dir), tokenizer=str(model_dir), batch_size=batch_size,
                    device="cpu")
    chunk = 2 * batch_size
    with precision(dtype):
        pipe(texts[:chunk], truncation=True)  # warm up: first calls allocate and pick kernels
        n, i, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            part = [texts[(i + k) % len(texts)] for k in range(chunk)]
            pipe(part, truncation=True)
            n, i = n + chunk, i + chunk
        return n / (time.perf_counter() - start)


def measure_forward(model_dir: Path, texts: list[str], dtype: str, budget_s: float, most: int = 200) -> float:
    """Median ms of one forward pass on one text; texts cycle so lengths match what the load generator sends."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    inputs = [tok(t, truncation=True, return_tensors="pt") for t in texts[:most]]
    times = []
    with torch.inference_mode(), precision(dtype):
        for x in inputs[:5]:
            model(**x)  # warm up
        start = time.perf_counter()
        for x in inputs:
            t = time.perf_counter()
            model(**x)
            times.append(time.perf_counter() - t)
            if time.perf_counter() - start > budget_s and len(times) >= 20:
                break
    return statistics.median(times) * 1000


# -- models and texts -----------------------------------------------------------------------------------------------

def build_base_model(tokenizer_dir: Path, out: Path) -> Path:
    """A DistilBERT-base-size classifier (default config: 6 layers, dim 768) with random weights.

    Random weights are enough: speed does not depend on the values. It uses the tiny tokenizer, so the texts
    have the same token counts for both sizes and only the model's size differs.
    """
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = DistilBertConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                              id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def model_facts(model_dir: Path, texts: list[str]) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    counts = [len(ids) for ids in tok(texts, truncation=True)["input_ids"]]
    cfg = AutoConfig.from_pretrained(str(model_dir))
    return {"model_dir": str(model_dir), "layers": cfg.n_layers, "dim": cfg.dim,
            "mean_tokens": rounded(statistics.fmean(counts), 1), "max_tokens": max(counts)}


# -- one size, end to end -------------------------------------------------------------------------------------------

def bench_size(name: str, model_dir: Path, texts: list[str], texts_file: Path, work: Path, args) -> dict:
    result = model_facts(model_dir, texts)
    log(f"{name}: {result['layers']} layers, dim {result['dim']}, mean {result['mean_tokens']} tokens per text")
    # In-process numbers first, while nothing else runs; the models are freed before the service starts.
    result["forward_ms_single"] = rounded(measure_forward(model_dir, texts, args.dtype, budget_s=args.duration / 2))
    log(f"{name}: one forward pass {result['forward_ms_single']} ms (median)")
    result["ceiling_texts_per_s"] = rounded(
        measure_ceiling(model_dir, texts, args.max_batch_size, args.dtype, args.duration), 1)
    log(f"{name}: pipeline ceiling {result['ceiling_texts_per_s']} texts/s (batch {args.max_batch_size})")
    result["service"] = measure_service(model_dir, work, texts_file, args, args.max_batch_size)
    result["unbatched"] = measure_service(model_dir, work, texts_file, args, 1)
    result.update(derived(result))
    return result


def derived(r: dict) -> dict:
    top, unbatched, c1 = r["service"]["64"], r["unbatched"]["64"], r["service"]["1"]
    ratio = top["texts_per_s"] / r["ceiling_texts_per_s"]
    speedup = top["texts_per_s"] / unbatched["texts_per_s"] if unbatched["texts_per_s"] else float("inf")
    gap = c1["p50_ms"] - r["forward_ms_single"]
    # How much batching can gain at all on this machine: the ceiling against back-to-back single-text forwards.
    # speedup_vs_unbatched cannot be much above it (unbatched also pays HTTP per text, so it can be a bit above).
    batching_gain = r["ceiling_texts_per_s"] * r["forward_ms_single"] / 1000
    return {
        "in_process_batching_gain": rounded(batching_gain),
        "ratio_to_ceiling": rounded(ratio, 3),
        "speedup_vs_unbatched": rounded(speedup, 2),
        "p50_c1_minus_forward_ms": rounded(gap),
        "targets_met": {
            "ratio_to_ceiling>=0.85": ratio >= TARGETS["ratio_to_ceiling"],
            "speedup_vs_unbatched>=4": speedup >= TARGETS["speedup_vs_unbatched"],
            "p50_c1_within_10ms_of_forward": gap <= TARGETS["p50_c1_minus_forward_ms"],
        },
    }


# -- replicas: RewardClient spreading over 1 vs 2 reward services ---------------------------------------------------

REPLICA_TARGET = 1.7  # 2 replicas against 1


def client_load(services: list[tuple[str, object]], texts: list[str], args) -> dict:
    """`args.replica_callers` threads calling one RewardClient's score() in a closed loop against `services`."""
    import threading

    from shared.clients import RewardClient

    urls, pids = [u for u, _ in services], [proc.pid for _, proc in services]
    n, size = len(urls), args.replica_call_texts
    client = RewardClient(urls, chunk_size=args.max_batch_size, max_concurrency=2 * n, timeout=120)
    stop = threading.Event()
    calls, errors = [], []

    def caller(k: int) -> None:
        i = k * size
        while not stop.is_set():
            batch = [texts[(i + j) % len(texts)] for j in range(size)]
            i += args.replica_callers * size
            try:
                client.score(batch)
                calls.append(time.perf_counter())
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(repr(exc))

    def snapshot() -> dict:
        reps = {r.url: r.answered for r in client.replicas}
        return {"t": time.perf_counter(), "answered": reps, "client_cpu": time.process_time(),
                "service_cpu": [common.process_cpu_seconds(pid) for pid in pids]}

    workers = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(args.replica_callers)]
    for w in workers:
        w.start()
    time.sleep(args.warmup)
    first = snapshot()
    time.sleep(args.duration)
    last = snapshot()
    stop.set()
    for w in workers:
        w.join(timeout=120)
    client.close()
    wall = last["t"] - first["t"]
    requests = {u: last["answered"][u] - first["answered"].get(u, 0) for u in urls}
    return {
        "replicas": n,
        "texts_per_s": rounded(sum(requests.values()) * args.max_batch_size / wall, 1),
        "calls_per_s": rounded(sum(first["t"] <= t <= last["t"] for t in calls) / wall, 2),
        "requests_per_replica": list(requests.values()),
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "service_cpu_cores": [rounded((b - a) / wall) for a, b in zip(first["service_cpu"], last["service_cpu"])],
        "client_cpu_cores": rounded((last["client_cpu"] - first["client_cpu"]) / wall),
    }


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` onto `cpus` (sched_setaffinity on a pid moves only its main thread)."""
    import os

    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def bench_replicas(model_dir: Path, texts: list[str], work: Path, args) -> dict:
    import os

    settings = {"model_dir": str(model_dir), "callers": args.replica_callers,
                "texts_per_call": args.replica_call_texts, "texts_per_request": args.max_batch_size,
                "in_flight_per_replica_per_call": 2}
    every_core = os.sched_getaffinity(0)
    result: dict = {**settings}
    with contextlib.ExitStack() as stack:
        services = [stack.enter_context(reward_service(
            model_dir, work, f"replica-{i}", threads=args.threads, dtype=args.dtype, max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms, log_level=args.service_log_level)) for i in range(2)]
        for mode in ("shared", "one_core_each"):
            cores = sorted(every_core)
            for i, (_, proc) in enumerate(services):
                pin(proc.pid, {cores[i % len(cores)]} if mode == "one_core_each" else every_core)
            runs = {}
            for n in (1, 2):
                r = client_load(services[:n], texts, args)
                log(f"{mode}, replicas={n}: {r['texts_per_s']} texts/s, requests per replica "
                    f"{r['requests_per_replica']}, services {r['service_cpu_cores']} cores, client "
                    f"{r['client_cpu_cores']} cores, errors {r['errors']}")
                runs[str(n)] = r
            one, two = runs["1"]["texts_per_s"], runs["2"]["texts_per_s"]
            runs["speedup"] = rounded(two / one, 2) if one else float("nan")
            result[mode] = runs
    best = max(result["shared"]["speedup"], result["one_core_each"]["speedup"])
    result["targets_met"] = {f"speedup>={REPLICA_TARGET} (shared)": result["shared"]["speedup"] >= REPLICA_TARGET,
                             f"speedup>={REPLICA_TARGET} (one_core_each)":
                                 result["one_core_each"]["speedup"] >= REPLICA_TARGET}
    log(f"2 replicas against 1: {result['shared']['speedup']}x shared, {result['one_core_each']['speedup']}x one "
        f"core each (best {best}x)")
    return result


# -- backends: each reward backend's in-process ceiling and service throughput ------------------------------------

BACKEND_TARGET = 3.0  # best backend's service at 64 clients against the float32 torch ceiling
DEFAULT_BACKENDS = {"cpu": "torch:float32,torch:bfloat16,onnx:float32,onnx:int8", "cuda": "torch:float32,torch:float16"}


def scorer_ceiling(scorer, texts: list[str], batch_size: int, duration: float) -> float:
    """texts/s of the service's own Scorer in this process: tokenize `batch_size` texts, pad, run the backend."""
    def one(i: int) -> int:
        part = [texts[(i + k) % len(texts)] for k in range(batch_size)]
        scorer.forward(scorer.tokenize(part, True))  # forward returns host lists: a GPU has finished by then
        return len(part)

    one(0)  # warm up: first calls allocate and pick kernels
    if scorer.device.startswith("cuda"):  # and on a GPU each new shape costs once: see every shape first
        for i in range(0, len(texts), batch_size):
            one(i)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration or n < 2 * batch_size:
        n += one(n)
    return n / (time.perf_counter() - start)


def bench_ceilings(model_dir: Path, texts: list[str], args) -> dict:
    """Each backend's Scorer ceiling, batched and at batch 1; loading it first exports any ONNX graph (cached)."""
    from services.reward.scorer import Scorer
    from shared.schemas import ModelSpec

    result = {}
    for name in args.backends:
        kind, dtype = name.split(":")
        scorer = Scorer(ModelSpec(source=str(model_dir), backend=kind, dtype=dtype), device=args.device)
        batched = scorer_ceiling(scorer, texts, args.max_batch_size, args.duration)
        single = scorer_ceiling(scorer, texts, 1, args.duration / 2)
        result[name] = {"ceiling_texts_per_s": rounded(batched, 1), "batch1_texts_per_s": rounded(single, 1),
                        "batching_speedup": rounded(batched / single, 2)}
        log(f"{name}: ceiling {batched:.1f} texts/s at batch {args.max_batch_size}, {single:.1f} at batch 1")
        del scorer
    return result


def bench_ceiling_part(model_dir: Path, texts: list[str], args) -> dict:
    result = {"model": model_facts(model_dir, texts), "device": args.device, "batch_size": args.max_batch_size,
              "per_backend": bench_ceilings(model_dir, texts, args)}
    if args.device.startswith("cuda"):
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    best = max(result["per_backend"], key=lambda k: result["per_backend"][k]["ceiling_texts_per_s"])
    result["best_backend"] = best
    result["batching_speedup"] = result["per_backend"][best]["batching_speedup"]
    return result


def bench_backends(model_dir: Path, texts: list[str], texts_file: Path, work: Path, args) -> dict:
    """Part backends: ceilings in this process first, while nothing else runs; then one service per backend."""
    result = {"model": model_facts(model_dir, texts), "batch_size": args.max_batch_size}
    fp32 = measure_ceiling(model_dir, texts, args.max_batch_size, "float32", args.duration)
    result["fp32_pipeline_ceiling_texts_per_s"] = rounded(fp32, 1)
    log(f"float32 torch pipeline ceiling {fp32:.1f} texts/s")
    per = bench_ceilings(model_dir, texts, args)
    for name in args.backends:
        kind, dtype = name.split(":")
        with reward_service(model_dir, work, f"backend-{kind}-{dtype}", threads=args.threads, dtype=dtype,
                            backend=kind, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                            log_level=args.service_log_level) as (url, proc):
            r = run_load(url, proc.pid, texts_file, 64, args.warmup, args.duration)
        log(f"{name}: service at 64 clients {r['texts_per_s']} texts/s, p50 {r['p50_ms']} ms, batch "
            f"{r['mean_batch_size']}, errors {r['errors']}")
        per[name]["service_64"] = r
        per[name]["service_64_vs_fp32_ceiling"] = rounded(r["texts_per_s"] / fp32, 2)
    result["per_backend"] = per
    best = max(per, key=lambda k: per[k]["service_64"]["texts_per_s"])
    top = per[best]["service_64"]["texts_per_s"]
    result["best_backend"] = best
    result["best_backend_vs_fp32_ceiling"] = rounded(top / fp32, 2)
    if "torch:float32" in per:
        result["best_backend_vs_fp32_scorer_ceiling"] = rounded(top / per["torch:float32"]["ceiling_texts_per_s"], 2)
    result["targets_met"] = {f"best_backend_vs_fp32_ceiling>={BACKEND_TARGET:g}": top / fp32 >= BACKEND_TARGET}
    log(f"best backend {best}: {top} texts/s at 64 clients, {result['best_backend_vs_fp32_ceiling']}x the float32 "
        "ceiling")
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="sizes,replicas", help="comma-separated: sizes, replicas, backends, ceiling")
    p.add_argument("--sizes", default="tiny,base", help="comma-separated: tiny, base (part sizes)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds measured per load level (and ceiling)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measured window")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the service and the ceiling (1 leaves a core to the load generator)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--max-batch-size", type=int, default=32, help="the service's batch size and the pipeline's")
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--service-log-level", default="warning", help="the service's log level (info logs each request)")
    p.add_argument("--replica-callers", type=int, default=4, help="threads calling score() (part replicas)")
    p.add_argument("--replica-call-texts", type=int, default=256, help="texts per score() call (part replicas)")
    p.add_argument("--backends", default=None, help="comma-separated kind:dtype (parts backends and ceiling); "
                   f"default {DEFAULT_BACKENDS['cpu']} (cuda: {DEFAULT_BACKENDS['cuda']})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: part ceiling only)")
    common.add_output_options(p)
    args = p.parse_args(argv)
    args.sizes = common.split_sizes(p, args.sizes, ("tiny", "base"))
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or set(args.parts) - {"sizes", "replicas", "backends", "ceiling"}:
        p.error(f"--parts takes sizes, replicas, backends and/or ceiling, got {args.parts}")
    if args.device != "cpu" and args.parts != ["ceiling"]:
        p.error("--device cuda measures part ceiling only: the services here run on the CPU")
    cuda = args.device.startswith("cuda")
    args.backends = [b.strip() for b in (args.backends or DEFAULT_BACKENDS["cuda" if cuda else "cpu"]).split(",")]
    known = {"torch:float32", "torch:bfloat16", "torch:float16", "onnx:float32", "onnx:int8"}
    if set(args.backends) - known:
        p.error(f"--backends takes {', '.join(sorted(known))}, got {args.backends}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    common.prepare_process(args.threads)
    started = time.perf_counter()
    settings = {"parts": args.parts, "dtype": args.dtype, "max_batch_size": args.max_batch_size,
                "max_wait_ms": args.max_wait_ms, "duration_s": args.duration, "warmup_s": args.warmup}
    report = common.report_header(args.threads, settings)
    report["device"] = args.device
    report["code"] = common.code_version()
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-reward-"))
    try:
        tiny = common.tiny_dir(args.tiny_dir, ("tiny-sentiment", "corpus/heldout.jsonl"))
        texts = common.heldout_texts(tiny)
        texts_file = work / "texts.json"
        texts_file.write_text(json.dumps(texts))
        base = work / "distilbert-base-random"
        if {"backends", "ceiling"} & set(args.parts) or ("sizes" in args.parts and "base" in args.sizes):
            build_base_model(tiny / "tiny-sentiment", base)
        for size in args.sizes if "sizes" in args.parts else []:
            model_dir = tiny / "tiny-sentiment" if size == "tiny" else base
            report[size] = bench_size(size, model_dir, texts, texts_file, work, args)
        if "replicas" in args.parts:
            report["replicas"] = bench_replicas(tiny / "tiny-sentiment", texts, work, args)
        if "ceiling" in args.parts:
            report["ceiling"] = bench_ceiling_part(base, texts, args)
            report["batching_speedup"] = report["ceiling"]["batching_speedup"]
        if "backends" in args.parts:
            report["backends"] = bench_backends(base, texts, texts_file, work, args)
            report["best_backend_vs_fp32_ceiling"] = report["backends"]["best_backend_vs_fp32_ceiling"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "base" in report:
        report["targets_met"] = report["base"]["targets_met"]  # the targets are about the base size
    if "replicas" in report:
        report.setdefault("targets_met", {}).update(report["replicas"]["targets_met"])
    if "backends" in report:
        report.setdefault("targets_met", {}).update(report["backends"]["targets_met"])
    common.print_report(report, started, args.out)


if __name__ == "__main__":
    common.main_or_loadgen(main, loadgen_main)
