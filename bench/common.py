"""Helpers shared by the benchmark scripts (bench/reward.py, bench/generator.py, bench/ppo.py).

Logging, rounding and strict JSON; machine and code facts; the start and the end of a run (process set-up, the
report's first and last fields); the tiny kit and the cached GPT-2-small-size model; a service under test (started
as `rlhf <service> serve` in a subprocess) and the load generator that loads it (the script re-run as `_loadgen`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_GPT2_DIR = REPO / ".cache" / "bench" / "gpt2-small"  # shared by bench/generator.py and bench/ppo.py
LOADGEN = "_loadgen"  # the first argument that makes a benchmark script run as its own load generator


# -- logging, numbers, JSON -------------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rounded(x: float, digits: int = 2) -> float:
    return round(x, digits) if math.isfinite(x) else x


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def without_nan(x):
    """NaN (a measurement with no samples) as null, so the output is strict JSON."""
    if isinstance(x, dict):
        return {k: without_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [without_nan(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# -- machine and code facts -------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> dict:
    """The commit measured and the tracked files changed since, so a number can be tied to the code behind it."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "changed": git("diff", "--name-only", "HEAD").splitlines()}


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc; NaN where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of stat(5)


# -- a run from start to end ------------------------------------------------------------------------------------------

def add_output_options(p: argparse.ArgumentParser) -> None:
    """The options every benchmark ends with: where the tiny kit is and where to write the result."""
    p.add_argument("--tiny-dir", default=None, help="tiny kit folder (default $RLHF_TINY_DIR or .cache/tiny)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")


def split_sizes(p: argparse.ArgumentParser, value: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated `--sizes` as a list; a usage error if it is empty or names a size not in `known`."""
    sizes = [s.strip() for s in value.split(",") if s.strip()]
    if set(sizes) - set(known) or not sizes:
        p.error(f"--sizes takes {' and/or '.join(known)}, got {sizes}")
    return sizes


def prepare_process(threads: int) -> None:
    """Process set-up, before torch is imported anywhere in it: no hub, and no OpenMP pool wider than asked for."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from shared.runtime import configure_torch

    configure_torch(threads)
    # A SIGTERM must still run the `finally`s that stop a service (and subprocess.run kills a load generator).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def report_header(threads: int, settings: dict) -> dict:
    """The report's first fields: the machine, this run's settings, and the machine's load as the run starts."""
    return {"device": "cpu", "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, **settings,
            "load_avg_at_start": os.getloadavg()[0]}


def print_report(report: dict, started: float, out: Path | None) -> None:
    """Add the load at the end and the wall time, then print the report as the last line of stdout (and to `out`)."""
    report["load_avg_at_end"] = os.getloadavg()[0]  # well above 1 + threads: something else shared the CPUs
    report["wall_s"] = rounded(time.perf_counter() - started, 1)
    result = without_nan(report)
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


# -- the tiny kit and the models --------------------------------------------------------------------------------------

def tiny_dir(arg: str | None, needed: tuple[str, ...]) -> Path:
    """The tiny kit: `arg`, else shared/tiny/kit.py's folder; built (about 2 minutes) when it is not complete or any
    of the `needed` paths inside it is missing."""
    from shared.tiny.kit import ensure_built

    return ensure_built(Path(arg) if arg else None, echo=log, needed=needed).resolve()


def heldout_texts(tiny: Path) -> list[str]:
    """The texts of the tiny corpus's held-out split, in file order."""
    lines = (tiny / "corpus" / "heldout.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def small_gpt2(tokenizer_dir: Path, out: Path = SMALL_GPT2_DIR) -> Path:
    """A GPT-2-small-size causal LM (12 layers, 12 heads, dim 768, 1024 positions) with random weights, built once.

    Random weights are enough: speed does not depend on the values. It uses the tiny tokenizer (vocabulary 1024),
    so prompts have the same token counts for both sizes and only the model's size differs. Built in a scratch
    folder and renamed into place, so an interrupted build is never taken for a finished one (about 350 MB).
    """
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    log(f"building the GPT-2-small-size model in {out}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=len(tok),
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(scratch)
        tok.save_pretrained(scratch)
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def gpt2_facts(model_dir: Path) -> dict:
    """Folder, layers, width and parameter count of a GPT-2 model, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir))
    d = cfg.n_embd
    # GPT-2 ties the output layer to the token embedding, so it adds no parameters.
    params = cfg.vocab_size * d + cfg.n_positions * d + cfg.n_layer * (12 * d * d + 13 * d) + 2 * d
    return {"model_dir": str(model_dir), "layers": cfg.n_layer, "dim": d, "params_millions": rounded(params / 1e6, 1)}


# -- the service under test -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rlhf_command() -> list[str]:
    script = Path(sys.executable).parent / "rlhf"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


def child_env(threads: int) -> dict[str, str]:
    # The service pins torch threads itself; the OpenMP variable also keeps its import from spawning one per core.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    """Until the service at `url` is ready (shared/readiness.py); RuntimeError with its log's tail when it exits,
    says its model failed to load, or is not ready in `timeout` s."""
    from shared.readiness import NotReady, wait_until_ready

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}:\n{tail(log_path)}")

    try:
        wait_until_ready(url, timeout, alive=alive)
    except NotReady as exc:
        raise RuntimeError(f"{exc}\n{tail(log_path)}") from None


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it does not exit within `timeout` s; only this one process, by its pid."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_service(service: str, config: dict, flags: list[str], work: Path, tag: str, *, threads: int,
                    stop_timeout: float):
    """`rlhf <service> serve` in a subprocess on a free loopback port, ready to serve; always stopped on the way out.

    `config` goes into a YAML file (for the settings that have no flag), `flags` onto the command line. The config
    and the service's log are `work`/`tag`.yaml and .log. Yields the service's URL and its process.
    """
    import yaml

    port = free_port()
    config_path = work / f"{tag}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cmd = [*rlhf_command(), service, "serve", "--config", str(config_path), "--port", str(port),
           "--torch-threads", str(threads), *flags]
    log_path = work / f"{tag}.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(threads))
    try:
        wait_ready(url, proc, log_path)
        yield url, proc
        if proc.poll() is not None:
            raise RuntimeError(f"service died during the run:\n{tail(log_path)}")
    finally:
        stop(proc, stop_timeout)


# -- the load generator: this side starts it, the other side is the script re-run as `_loadgen` ----------------------

def run_loadgen(script: str, options: dict[str, object], timeout: float) -> dict:
    """One closed-loop measurement, generated by `script` re-run as `_loadgen` with `options` (`--name value`).

    A separate process, so the load generator does not share the service's GIL. Returns its JSON result.
    """
    flags = [part for name, value in options.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    cmd = [sys.executable, str(Path(script).resolve()), LOADGEN, *flags]
    # subprocess.run kills the child if it times out or this process is interrupted.
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def loadgen_parser(script_name: str) -> argparse.ArgumentParser:
    """The `_loadgen` options every script takes; each adds its own (what to send) before parsing."""
    p = argparse.ArgumentParser(prog=f"{script_name} {LOADGEN}")
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--warmup", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--service-pid", type=int, required=True)
    return p


def main_or_loadgen(main, loadgen_main) -> None:
    """A script's entry point: `script.py _loadgen ...` runs its load generator, anything else the benchmark."""
    if len(sys.argv) > 1 and sys.argv[1] == LOADGEN:
        loadgen_main(sys.argv[2:])
    else:
        main(sys.argv[1:])


async def open_clients(stack: contextlib.AsyncExitStack, url: str, concurrency: int, timeout: float,
                       probe_timeout: float) -> tuple[list, object]:
    """`concurrency` HTTP clients, one per simulated user, and a probe client for /metrics; closed with `stack`."""
    import httpx

    # One client (one keep-alive connection) per simulated user, as a real fleet of callers would have: with one
    # shared httpx pool of 64 connections the load generator spent ~7 ms of CPU per request (bench/reward.py) and
    # capped the load near 100 requests/s.
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=one, timeout=timeout))
               for _ in range(concurrency)]
    probe = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=probe_timeout))
    return clients, probe


def histogram_totals(text: str, histogram: str) -> dict[str, float]:
    """`<histogram>_sum` and `<histogram>_count` from a Prometheus scrape, each summed over its labels."""
    wanted = (f"{histogram}_sum", f"{histogram}_count")
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def snapshot(probe, service_pid: int, histogram: str) -> dict:
    """Counters read at a window edge; the difference of two gives what happened inside the window."""
    # Clock and CPU first: the /metrics answer can wait behind queued requests or a running batch.
    edge = {"t": time.perf_counter(), "service_cpu": process_cpu_seconds(service_pid),
            "loadgen_cpu": time.process_time()}
    try:
        edge.update(histogram_totals((await probe.get("/metrics")).text, histogram))
    except Exception as exc:  # noqa: BLE001 - the batch size is a diagnostic; the measurement stands without it
        log(f"  (could not read /metrics: {exc})")
    return edge


def mean_batch_size(first: dict, last: dict, histogram: str) -> float:
    """Items per batch between two snapshots, from the service's batch-size histogram; NaN if no batch ran."""
    batches = last.get(f"{histogram}_count", 0) - first.get(f"{histogram}_count", 0)
    items = last.get(f"{histogram}_sum", 0) - first.get(f"{histogram}_sum", 0)
    return rounded(items / batches) if batches else float("nan")


def cpu_cores(first: dict, last: dict) -> dict:
    """The service's and the load generator's CPU use between two snapshots, in cores."""
    elapsed = last["t"] - first["t"]
    return {"service_cpu_cores": rounded((last["service_cpu"] - first["service_cpu"]) / elapsed),
            "loadgen_cpu_cores": rounded((last["loadgen_cpu"] - first["loadgen_cpu"]) / elapsed)}


# -- real-size models with random weights (bench/rehearsal.py) --------------------------------------------------------

# The hub configs of gpt2 (lvwerra/gpt2-imdb's) and distilbert-base-uncased (lvwerra/distilbert-imdb's), sizes only.
GPT2_SMALL = {"vocab_size": 50257, "n_positions": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
DISTILBERT_BASE = {"vocab_size": 30522, "max_position_embeddings": 512, "n_layers": 6, "n_heads": 12, "dim": 768,
                   "hidden_dim": 3072}


def saved_random_model(out: Path, build) -> Path:
    """`build()` -> (model, tokenizer), saved in `out` unless it is already there; written under a temporary name and
    renamed when complete (the tiny kit's `_atomic_dir`), so an interrupted build is never taken for a finished one."""
    from shared.tiny.build import _atomic_dir

    def write(tmp: Path) -> None:
        log(f"building {out}")
        model, tok = build()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(out.parent, out.name, write)


def _fits(tok, vocab_size: int):
    # A smaller tokenizer only leaves embedding rows unused; a larger one would index past the embedding.
    if len(tok) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the model's {vocab_size}")
    return tok


def gpt2_small_random(tok, out: Path) -> Path:
    """A GPT-2 small of the hub's exact size (vocabulary 50257 included) with random weights, saved with `tok`."""
    def build():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        _fits(tok, GPT2_SMALL["vocab_size"])
        eos = tok.eos_token_id
        torch.manual_seed(0)
        config = GPT2Config(**GPT2_SMALL, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        return GPT2LMHeadModel(config).eval(), tok

    return saved_random_model(out, build)


def distilbert_base_random(tok, out: Path, labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE")) -> Path:
    """A DistilBERT-base sequence classifier of the hub's exact size (vocabulary 30522 included), random weights,
    `labels` in that order (distilbert-imdb's), saved with `tok`."""
    def build():
        import torch
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        _fits(tok, DISTILBERT_BASE["vocab_size"])
        torch.manual_seed(0)
        config = DistilBertConfig(**DISTILBERT_BASE, pad_token_id=tok.pad_token_id,
                                  id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
        return DistilBertForSequenceClassification(config).eval(), tok

    return saved_random_model(out, build)


async def snapshot_histograms(probe, service_pid: int, histograms: tuple[str, ...]) -> dict:
    """`snapshot` with the sums and counts of several histograms, from one /metrics scrape."""
    edge = {"t": time.perf_counter(), "service_cpu": process_cpu_seconds(service_pid),
            "loadgen_cpu": time.process_time()}
    try:
        text = (await probe.get("/metrics")).text
        for histogram in histograms:
            edge.update(histogram_totals(text, histogram))
    except Exception as exc:  # noqa: BLE001 - diagnostics; the measurement stands without them
        log(f"  (could not read /metrics: {exc})")
    return edge


def histogram_mean(first: dict, last: dict, histogram: str) -> float:
    """Mean observed value between two snapshots (unrounded); NaN if nothing was observed."""
    count = last.get(f"{histogram}_count", 0) - first.get(f"{histogram}_count", 0)
    total = last.get(f"{histogram}_sum", 0) - first.get(f"{histogram}_sum", 0)
    return total / count if count else float("nan")


# -- memory ------------------------------------------------------------------------------------------------------------

def max_rss_mb() -> float:
    """This process's peak resident memory so far, in MB: VmHWM where /proc has it, else ru_maxrss (which Linux
    carries over from the parent at fork and exec: a child of a big process would report the parent's size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
