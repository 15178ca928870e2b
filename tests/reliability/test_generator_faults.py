"""Generator faults over real HTTP with the tiny policy: broken weights, a dying batch worker, shutdown, a slow base
load, stream admission and abandoned streams, the memory bound, checkpoint discovery and rewritten checkpoints."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import statistics
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import services.generator.checkpoints as store_module
from services.generator.app import create_app
from shared.checkpoints import write_checkpoint
from tests.reliability.conftest import generator_settings, watch_readyz

pytestmark = pytest.mark.slow


def save_model(kit: Path, root: Path, name: str, edit=None) -> Path:
    """Checkpoint `name` (`<run>/step-<N>`) as the trainer commits it: the tiny policy, `edit`ed in place."""
    model = AutoModelForCausalLM.from_pretrained(kit / "tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(kit / "tiny-gpt2")
    if edit is not None:
        with torch.no_grad():
            edit(model)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    run, step = name.split("/step-")
    return write_checkpoint(root, run, int(step), save)


def never_eos(model) -> None:
    """Hidden unit 0 after the final norm is constant 1 and the EOS embedding (tied to the LM head) weighs it by
    -1000: the policy talks until max_tokens, which a stream needs to be long."""
    model.transformer.ln_f.weight[0], model.transformer.ln_f.bias[0] = 0.0, 1.0
    model.transformer.wte.weight[0, 0] = -1000.0


def nan_weights(model) -> None:
    model.transformer.ln_f.weight.fill_(float("nan"))


def perturbed(model) -> None:
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def generate(url: str, checkpoint: str = "base", **body) -> httpx.Response:
    body = {"prompts": ["I watched The"], "checkpoint": checkpoint, "max_new_tokens": 4, **body}
    return httpx.post(url + "/v1/generate", json=body, timeout=60)


def tokens_made(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(x for x in text.splitlines() if x.startswith("generator_tokens_generated_total")).split()[-1])


def server_loop(server) -> asyncio.AbstractEventLoop:
    return server.server.servers[0].get_loop()


# -- 2: broken weights ----------------------------------------------------------------------------------------------

def test_non_finite_logits_are_a_logged_500(tiny_kit, tmp_path, serve, caplog):
    save_model(tiny_kit, tmp_path, "nan/step-1", nan_weights)
    s = serve(create_app(generator_settings(tiny_kit, tmp_path)))
    caplog.set_level(logging.ERROR)
    for extra in ({"do_sample": False}, {"seed": 1}):
        r = generate(s.url, "nan/step-1", **extra)
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "inference_error" and "non-finite logits" in error["message"]
        assert error["request_id"] in caplog.text
    body = {"model": "nan/step-1", "prompt": "a", "max_tokens": 4, "stream": True}
    r = httpx.post(s.url + "/v1/completions", json=body)  # fails on its first token: before the stream starts
    assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"], r.text
    assert generate(s.url).status_code == 200


# -- 3: the batch worker and shutdown -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, step", [("continuous", "_admit"), ("static", "_take_batch")])
def test_readyz_follows_the_batch_worker(tiny_kit, serve, mode, step):
    app = create_app(generator_settings(tiny_kit, None, batching={"mode": mode}))
    s = serve(app)
    batcher = app.state.batcher  # the continuous scheduler or the static batcher: the step that picks the rows
    take = getattr(batcher, step)

    def die_once():  # a bug in the worker itself (never a model error): it dies and restarts after a pause
        setattr(batcher, step, take)
        raise RuntimeError("injected worker fault")

    setattr(batcher, step, die_once)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(generate, s.url)
        seen = watch_readyz(s.url)
        assert [r.status_code for r in seen][-1] == 200
        down = [r for r in seen if r.status_code == 503]
        assert down and all("injected worker fault" in r.json()["error"]["message"] and r.headers["retry-after"]
                            for r in down)
        assert pending.result().status_code == 200  # its item waited for the restarted worker


def test_requests_after_the_batcher_closes_get_503(tiny_kit, serve):
    app = create_app(generator_settings(tiny_kit, None))
    s = serve(app)
    assert generate(s.url).status_code == 200
    asyncio.run_coroutine_threadsafe(app.state.batcher.close(), server_loop(s)).result(10)
    server_loop(s).call_soon_threadsafe(app.state.streams.close)
    for path, body in (("/v1/generate", {"prompts": ["a"], "checkpoint": "base"}),
                       ("/v1/completions", {"model": "base", "prompt": "a"}),
                       ("/v1/completions", {"model": "base", "prompt": "a", "stream": True})):
        r = httpx.post(s.url + path, json=body)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.json()["error"]["type"] == "unavailable"


# -- 4: while the base model loads ----------------------------------------------------------------------------------

def test_every_route_says_503_while_the_base_model_loads(tiny_kit, tmp_path, serve, monkeypatch):
    save_model(tiny_kit, tmp_path, "run/step-1")
    release = threading.Event()
    real = store_module.load_policy

    def slow_base(name, *args, **kw):
        if name == store_module.BASE:
            release.wait(30)
        return real(name, *args, **kw)

    monkeypatch.setattr(store_module, "load_policy", slow_base)
    s = serve(create_app(generator_settings(tiny_kit, tmp_path)), ready_path="/healthz")
    calls = [("POST", "/v1/generate", {"prompts": ["a"], "checkpoint": name})
             for name in ("base", "latest", "run/step-1", "run/step-2", "nope")]
    calls += [("POST", "/v1/completions", {"model": name, "prompt": "a", "stream": stream})
              for name in ("latest", "run/step-1", "run/step-9") for stream in (False, True)]
    calls += [("GET", "/v1/checkpoints", None), ("GET", "/readyz", None)]
    try:
        for method, path, body in calls:
            r = httpx.request(method, s.url + path, json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", (path, body, r.text)
            assert "loading" in r.json()["error"]["message"]
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while httpx.get(s.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert generate(s.url, "run/step-1").status_code == 200
    assert generate(s.url, "run/step-2").status_code == 404


# -- 5 and 6: stream admission, abandoned streams -------------------------------------------------------------------

def slowed(load, name: str, seconds: float):
    """`load_policy` whose model `name` takes `seconds` more per forward pass (a bigger model, in effect)."""

    def load_slow(loading: str, *args, **kw):
        policy = load(loading, *args, **kw)
        if loading == name:
            forward = policy.model.forward

            def slow_forward(*a, **k):
                time.sleep(seconds)
                return forward(*a, **k)

            policy.model.forward = slow_forward
        return policy

    return load_slow


@pytest.fixture(scope="module")
def chatty(tiny_kit, tmp_path_factory):
    """A server whose `talk/step-1` never says EOS and takes 8 ms a token (an abandoned 200-token choice would
    hold the model for 1.6 s), with room for 64 streamed sequences."""
    from tests.conftest import ServerThread

    root = tmp_path_factory.mktemp("chatty")
    save_model(tiny_kit, root, "talk/step-1", never_eos)
    settings = generator_settings(tiny_kit, root, batching={"max_streams": 64})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_module, "load_policy", slowed(store_module.load_policy, "talk/step-1", 0.008))
        s = ServerThread(create_app(settings)).start()
        yield s
    s.stop()


def open_stream(client: httpx.Client, **body):
    body = {"model": "talk/step-1", "prompt": "I watched The", "max_tokens": 200, "stream": True, **body}
    return client.stream("POST", "/v1/completions", json=body)


def test_streams_have_admission_control(chatty):
    with httpx.Client(base_url=chatty.url, timeout=60) as a, httpx.Client(base_url=chatty.url, timeout=60) as b:
        with open_stream(a, prompt=["I watched The"] * 4, n=16) as first:  # all 64 slots
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection, which ends the stream
            next(lines)
            with open_stream(b, max_tokens=2) as second:
                second.read()
                assert second.status_code == 429 and second.headers["retry-after"] == "1"
                assert second.headers["content-type"] == "application/json"  # refused before any event
                assert second.json()["error"]["type"] == "overloaded"
            batched = b.post("/v1/completions", json={"model": "talk/step-1", "prompt": "a", "max_tokens": 2})
            assert batched.status_code == 200  # batched requests are not shut out by streams
        too_many = b.post("/v1/completions", json={"model": "base", "prompt": ["a"] * 5, "n": 13, "stream": True})
        assert too_many.status_code == 413, too_many.text
        with open_stream(b, max_tokens=3) as again:  # the closed stream gave its slots back
            assert again.status_code == 200 and again.read().endswith(b"data: [DONE]\n\n")


def test_an_abandoned_stream_stops_generating(chatty):
    made: list[int] = []

    def timed() -> float:  # a short request, on the base model: it only waits for the model lock
        started = time.perf_counter()
        r = generate(chatty.url, "base", max_new_tokens=20, do_sample=False)
        made.append(r.json()["completions"][0]["tokens"])
        return time.perf_counter() - started

    assert generate(chatty.url, "talk/step-1", max_new_tokens=1).status_code == 200  # loaded
    idle = statistics.median(timed() for _ in range(3))
    before = tokens_made(chatty.url)
    with httpx.Client(base_url=chatty.url, timeout=60) as client:
        # 64 choices of 200 tokens each: seconds of work if nothing stopped it.
        with open_stream(client, prompt=["I watched The"] * 4, n=16) as stream:
            events = [line for line, _ in zip(stream.iter_lines(), range(6)) if line.startswith("data: {")]
            assert len(events) >= 3 and all("error" not in json.loads(e[6:]) for e in events)
    at_close = tokens_made(chatty.url)
    after = timed()
    time.sleep(0.3)
    streamed_after_close = tokens_made(chatty.url) - at_close - made[-1]
    assert after < 3 * idle + 0.5, (after, idle)
    assert streamed_after_close <= 5, streamed_after_close
    assert at_close - before < 100, at_close - before  # half a choice at most, of the 64 asked for


# -- 7: the memory bound --------------------------------------------------------------------------------------------

def test_resident_models_are_bounded(tiny_kit, tmp_path, serve, monkeypatch):
    names = [f"mem/step-{i}" for i in range(1, 5)]
    first = save_model(tiny_kit, tmp_path, names[0])
    for name in names[1:]:
        shutil.copytree(first, tmp_path / name)
    app = create_app(generator_settings(tiny_kit, tmp_path, max_loaded_checkpoints=1, max_concurrent_loads=1))
    real, seen, models = store_module.load_policy, [], []

    def observed(name, *args, **kw):
        if name == store_module.BASE:
            return real(name, *args, **kw)
        seen.append(app.state.store.resident)  # models in memory as this load starts (it counts itself)
        time.sleep(0.2)  # loads overlap with the other requests
        policy = real(name, *args, **kw)
        models.append(weakref.ref(policy.model))
        return policy

    monkeypatch.setattr(store_module, "load_policy", observed)
    s = serve(app)

    async def burst(todo: list[str]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json={"prompts": ["a"], "checkpoint": n,
                                                                       "max_new_tokens": 2}) for n in todo))

    todo, rounds = names * 2, 0
    while todo and rounds < 20:
        responses = asyncio.run(burst(todo))
        assert {r.status_code for r in responses} <= {200, 429}, [r.text for r in responses]
        assert all(r.headers["retry-after"] for r in responses if r.status_code == 429)
        todo, rounds = [n for n, r in zip(todo, responses) if r.status_code == 429], rounds + 1
    assert not todo and rounds > 1  # some were refused at first, every one served in the end
    assert max(seen) <= 1 + 1 + 1, seen  # base + max_loaded_checkpoints + max_concurrent_loads
    gc.collect()
    assert sum(ref() is not None for ref in models) == 1  # evicted models were freed, not kept by a cache
    assert app.state.store.resident == 2
    metrics = httpx.get(s.url + "/metrics").text
    assert "generator_loaded_checkpoints 2.0" in metrics


# -- 8: discovery: cached, off the loop, unreadable folders ---------------------------------------------------------

def test_latest_is_resolved_off_the_loop_and_cached(tiny_kit, tmp_path, serve, monkeypatch):
    save_model(tiny_kit, tmp_path, "run/step-1")
    real, scans = store_module.scan_checkpoints, []

    def slow_scan(root):
        scans.append(time.monotonic())
        time.sleep(0.3)
        return real(root)

    monkeypatch.setattr(store_module, "scan_checkpoints", slow_scan)
    s = serve(create_app(generator_settings(tiny_kit, tmp_path)))

    async def burst():
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            latest = [c.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 1}) for _ in range(20)]
            listings = [c.get("/v1/checkpoints") for _ in range(5)]
            task = asyncio.gather(*latest, *listings)
            await asyncio.sleep(0.05)  # the first scan is under way: the loop must still answer at once
            started = time.perf_counter()
            assert (await c.get("/healthz")).status_code == 200
            waited = time.perf_counter() - started
            return await task, waited

    responses, waited = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["checkpoint"] for r in responses[:20]} == {"run/step-1"}
    assert waited < 0.2, waited
    assert len(scans) <= 2, len(scans)
    save_model(tiny_kit, tmp_path, "run/step-2")  # a commit changes the tree: seen at once, no TTL wait
    assert generate(s.url, "latest").json()["checkpoint"] == "run/step-2"


def test_unreadable_folders_are_skipped(tiny_kit, tmp_path, serve, monkeypatch):
    save_model(tiny_kit, tmp_path, "run/step-1")
    shutil.copytree(tmp_path / "run", tmp_path / "locked")
    (tmp_path / "lost+found").mkdir()
    real = os.scandir

    def scandir(path="."):  # as root, mode 000 does not stop us: refuse the way the kernel would for others
        if {"locked", "lost+found"} & set(Path(path).parts):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    s = serve(create_app(generator_settings(tiny_kit, tmp_path)))
    r = httpx.get(s.url + "/v1/checkpoints")
    assert r.status_code == 200, r.text
    assert [c["name"] for c in r.json()["checkpoints"]] == ["base", "run/step-1"]
    assert generate(s.url, "latest").json()["checkpoint"] == "run/step-1"
    assert generate(s.url, "locked/step-1").status_code in (404, 409)


# -- 9: a checkpoint rewritten under the same name ------------------------------------------------------------------

def test_a_rewritten_checkpoint_serves_its_new_weights(tiny_kit, tmp_path, serve):
    s = serve(create_app(generator_settings(tiny_kit, tmp_path)))
    body = {"do_sample": False, "max_new_tokens": 12}
    path = save_model(tiny_kit, tmp_path, "rw/step-1")
    old = generate(s.url, "rw/step-1", **body).json()["completions"][0]["completion"]
    assert old == generate(s.url, "base", **body).json()["completions"][0]["completion"]
    save_model(tiny_kit, tmp_path, "rw/step-1", perturbed)
    new = generate(s.url, "rw/step-1", **body).json()["completions"][0]["completion"]

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("I watched The", return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.eos_token_id)[0]
    expected = out[ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert new != old and new == tokenizer.decode(expected, skip_special_tokens=True)
    listing = {c["name"]: c for c in httpx.get(s.url + "/v1/checkpoints").json()["checkpoints"]}
    assert listing["rw/step-1"]["loaded"]
