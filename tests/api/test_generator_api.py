"""The generator service over real HTTP with the tiny policy: parity, seeds, checkpoints, limits, OpenAI API."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.generator.app import create_app
from services.generator.settings import GeneratorSettings
from shared.checkpoints import write_checkpoint
from tests.conftest import ServerThread

pytestmark = pytest.mark.slow

PROMPTS = ["I watched The", "The story follows a young", "This", "We went to see The Silent Harbor at the"]


def make_settings(kit: Path, checkpoints: Path | None = None, **kw) -> GeneratorSettings:
    return GeneratorSettings(model=str(kit / "tiny-gpt2"), checkpoints=checkpoints, port=0, device="cpu", **kw)


def save_perturbed(kit: Path, root: Path, run: str, step: int, scale: float = 0.0, metrics=None) -> Path:
    """A checkpoint as the trainer writes it: the tiny policy with its weights nudged (0: unchanged)."""
    model = AutoModelForCausalLM.from_pretrained(kit / "tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(kit / "tiny-gpt2")
    if scale:
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_checkpoint(root, run, step, save, metrics=metrics or {"eval/reward_mean": 0.1 * step})


@pytest.fixture(scope="module")
def server(tiny_kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    s = ServerThread(create_app(make_settings(tiny_kit, root))).start()
    s.root = root
    yield s
    s.stop()


def gen(url: str, **body) -> httpx.Response:
    body.setdefault("checkpoint", "base")
    return httpx.post(url + "/v1/generate", json=body, timeout=60)


def test_greedy_output_equals_in_process_generate_token_for_token(server, tiny_kit):
    model = AutoModelForCausalLM.from_pretrained(tiny_kit / "tiny-gpt2").eval()
    tok = AutoTokenizer.from_pretrained(tiny_kit / "tiny-gpt2")
    r = gen(server.url, prompts=PROMPTS, do_sample=False, max_new_tokens=24)
    assert r.status_code == 200, r.text
    completions = r.json()["completions"]
    for prompt, c in zip(PROMPTS, completions):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        expected = out.tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id)]
        assert tok(c["completion"], add_special_tokens=False).input_ids == expected
        assert c["tokens"] == len(expected) and c["text"] == prompt + c["completion"]
        assert c["finish_reason"] == ("length" if len(expected) == 24 else "stop")


def test_same_seed_same_text_other_seed_other_text(server):
    body = {"prompts": PROMPTS, "max_new_tokens": 20, "seed": 7, "num_return_sequences": 2}
    first = gen(server.url, **body).json()["completions"]

    async def busy():  # the same request amid unseeded traffic
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            noise = [c.post("/v1/generate", json={"prompts": PROMPTS, "checkpoint": "base"}) for _ in range(4)]
            seeded = c.post("/v1/generate", json={**body, "checkpoint": "base"})
            return (await asyncio.gather(*noise, seeded))[-1]

    again = asyncio.run(busy()).json()["completions"]
    assert [c["text"] for c in again] == [c["text"] for c in first]
    other = gen(server.url, **{**body, "seed": 8}).json()["completions"]
    assert [c["text"] for c in other] != [c["text"] for c in first]
    assert len(first) == 2 * len(PROMPTS) and [c["index"] for c in first] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_sampling_parameters_take_effect(server):
    greedy = gen(server.url, prompts=["I watched The"], do_sample=False, max_new_tokens=12).json()["completions"]
    warm = gen(server.url, prompts=["I watched The"], seed=1, max_new_tokens=12).json()["completions"]
    hot = gen(server.url, prompts=["I watched The"], temperature=5.0, seed=1, max_new_tokens=12).json()
    assert hot["completions"][0]["text"] != warm[0]["text"]  # same seed, other temperature
    top1 = gen(server.url, prompts=["I watched The"], top_k=1, seed=2, max_new_tokens=12).json()["completions"]
    assert top1[0]["text"] == greedy[0]["text"]
    stopped = gen(server.url, prompts=["I watched The"], do_sample=False, max_new_tokens=24, stop=["."]).json()
    c = stopped["completions"][0]
    assert "." not in c["completion"] and c["finish_reason"] == "stop"


def test_concurrent_requests_share_generate_calls(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json={"prompts": [p], "checkpoint": "base",
                                                                        "max_new_tokens": 16}) for p in PROMPTS * 4))

    responses = asyncio.run(main())
    assert all(r.status_code == 200 and len(r.json()["completions"]) == 1 for r in responses)
    metrics = httpx.get(server.url + "/metrics").text
    total = float(next(x for x in metrics.splitlines() if x.startswith("generator_batch_size_sum")).split()[-1])
    calls = float(next(x for x in metrics.splitlines() if x.startswith("generator_batch_size_count")).split()[-1])
    assert total / calls > 1
    assert "generator_tokens_generated_total" in metrics and "generator_loaded_checkpoints" in metrics


def test_checkpoints_written_while_serving_become_servable(server, tiny_kit):
    before = {c["name"] for c in httpx.get(server.url + "/v1/checkpoints").json()["checkpoints"]}
    assert "base" in before
    save_perturbed(tiny_kit, server.root, "hot", 10, scale=0.02, metrics={"eval/reward_mean": 0.7})
    listing = {c["name"]: c for c in httpx.get(server.url + "/v1/checkpoints").json()["checkpoints"]}
    assert listing["hot/step-10"]["valid"] and listing["hot/step-10"]["step"] == 10
    assert listing["hot/step-10"]["metrics"] == {"eval/reward_mean": 0.7}
    r = gen(server.url, prompts=["I watched The"], checkpoint="latest", do_sample=False, max_new_tokens=16)
    assert r.json()["checkpoint"] == "hot/step-10" and r.json()["step"] == 10
    base = gen(server.url, prompts=["I watched The"], do_sample=False, max_new_tokens=16).json()
    assert base["checkpoint"] == "base"
    named = gen(server.url, prompts=["I watched The"], checkpoint="hot/step-10", do_sample=False, max_new_tokens=16)
    assert named.json()["completions"] == r.json()["completions"]
    save_perturbed(tiny_kit, server.root, "hot", 20, scale=0.02)
    assert gen(server.url, prompts=["a"], checkpoint="latest").json()["checkpoint"] == "hot/step-20"


def test_half_written_checkpoints_are_never_listed_or_loaded(server, tiny_kit):
    run = server.root / "partial"
    tmp = run / ".step-5.tmp-999"
    shutil.copytree(tiny_kit / "tiny-gpt2", tmp)
    no_manifest = run / "step-6"
    shutil.copytree(tiny_kit / "tiny-gpt2", no_manifest)
    names = {c["name"] for c in httpx.get(server.url + "/v1/checkpoints").json()["checkpoints"]}
    assert not any(n.startswith("partial/") for n in names)
    for name in ("partial/step-5", "partial/step-6", "partial/.step-5.tmp-999"):
        r = gen(server.url, prompts=["a"], checkpoint=name)
        assert r.status_code == 404, r.text


def test_corrupt_checkpoints_are_reported_and_refused_while_others_serve(server, tiny_kit):
    missing = save_perturbed(tiny_kit, server.root, "broken", 1)
    (missing / "model.safetensors").unlink()
    truncated = save_perturbed(tiny_kit, server.root, "broken", 2)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage_config = save_perturbed(tiny_kit, server.root, "broken", 3)
    (garbage_config / "config.json").write_text('{"model_type": "no-such-architecture"}')

    listing = {c["name"]: c for c in httpx.get(server.url + "/v1/checkpoints").json()["checkpoints"]}
    assert not listing["broken/step-1"]["valid"] and "weights" in listing["broken/step-1"]["error"]
    assert not listing["broken/step-2"]["valid"] and "truncated" in listing["broken/step-2"]["error"]
    for step in (1, 2, 3):
        r = gen(server.url, prompts=["a"], checkpoint=f"broken/step-{step}")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["type"] == "checkpoint_invalid"
    listing = {c["name"]: c for c in httpx.get(server.url + "/v1/checkpoints").json()["checkpoints"]}
    assert not listing["broken/step-3"]["valid"]  # learnt from the failed load
    assert gen(server.url, prompts=["still fine"]).status_code == 200
    assert gen(server.url, prompts=["still fine"], checkpoint="latest").json()["checkpoint"] != "broken/step-3"


@pytest.mark.parametrize("name", [
    "../step-1", "../../etc/passwd", "/etc/passwd", "/tmp/x/step-1", "hot/../hot/step-10", "hot/step-10/..",
    "hot/step-1x", "hot\\step-10", "hot/step-10\x00", "~/step-1", "%2e%2e/step-1", "hot/step--1", ".hidden/step-1",
    "hot//step-10", "",
])
def test_checkpoint_names_cannot_escape_the_folder(server, name):
    r = gen(server.url, prompts=["a"], checkpoint=name)
    assert r.status_code == 404, (name, r.text)
    assert r.json()["error"]["message"]


def test_loaded_checkpoints_are_bounded_lru(tiny_kit, tmp_path, serve):
    s = serve(create_app(make_settings(tiny_kit, tmp_path, max_loaded_checkpoints=1)))
    for step in (1, 2):
        save_perturbed(tiny_kit, tmp_path, "lru", step, scale=0.01)
    assert gen(s.url, prompts=["a"], checkpoint="lru/step-1").status_code == 200
    assert gen(s.url, prompts=["a"], checkpoint="lru/step-2").status_code == 200
    loaded = {c["name"]: c["loaded"] for c in httpx.get(s.url + "/v1/checkpoints").json()["checkpoints"]}
    assert loaded == {"base": True, "lru/step-1": False, "lru/step-2": True}
    assert gen(s.url, prompts=["a"], checkpoint="lru/step-1").status_code == 200  # reloads on demand


BAD = {
    "no prompts": ({"prompts": []}, 422),
    "prompt not a string": ({"prompts": [1]}, 422),
    "too many prompts": ({"prompts": ["a"] * 65}, 413),
    "max_new_tokens over the limit": ({"prompts": ["a"], "max_new_tokens": 100_000}, 422),
    "max_new_tokens zero": ({"prompts": ["a"], "max_new_tokens": 0}, 422),
    "too many sequences": ({"prompts": ["a"], "num_return_sequences": 1000}, 422),
    "prompt too long": ({"prompts": ["word " * 600]}, 413),
    "huge prompt": ({"prompts": ["x" * 1_000_000]}, 413),
    "past the context": ({"prompts": ["word " * 200], "max_new_tokens": 200}, 422),
    "negative temperature": ({"prompts": ["a"], "temperature": -1}, 422),
    "top_p over one": ({"prompts": ["a"], "top_p": 1.5}, 422),
    "unknown field": ({"prompts": ["a"], "beams": 4}, 422),
    "unknown checkpoint": ({"prompts": ["a"], "checkpoint": "nope/step-1"}, 404),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_clear_4xx(server, case):
    body, status = BAD[case]
    body.setdefault("checkpoint", "base")
    r = httpx.post(server.url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert gen(server.url, prompts=["fine"], max_new_tokens=2).status_code == 200


def test_openai_client_completions(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="base", prompt=["I watched The", "This"], max_tokens=12, n=2, seed=3)
    assert len(out.choices) == 4 and out.model == "base"
    assert {c.index for c in out.choices} == {0, 1, 2, 3}
    assert out.usage.completion_tokens > 0
    again = client.completions.create(model="base", prompt=["I watched The", "This"], max_tokens=12, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    greedy = client.completions.create(model="base", prompt="I watched The", max_tokens=12, temperature=0)
    native = gen(server.url, prompts=["I watched The"], do_sample=False, max_new_tokens=12).json()
    assert greedy.choices[0].text == native["completions"][0]["completion"]

    chunks = list(client.completions.create(model="base", prompt="I watched The", max_tokens=12, temperature=0,
                                            stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == greedy.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope/step-1", prompt="a", max_tokens=2)


def test_generator_client_and_cli(server, tiny_kit):
    import subprocess
    import sys

    from shared.clients import GeneratorClient

    with GeneratorClient(server.url) as client:
        body = client.generate(["I watched The"], checkpoint="base", do_sample=False, max_new_tokens=10)
        assert body["checkpoint"] == "base" and any(c["name"] == "base" for c in client.checkpoints())
    out = subprocess.run([sys.executable, "-m", "services.cli", "generate", "I watched The", "--checkpoint", "base",
                          "--greedy", "--max-new-tokens", "10", "--url", server.url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == body["completions"][0]["text"]


def test_api_key_guards_v1_but_not_health_or_metrics(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit, api_key="gen-secret")))
    body = {"prompts": ["a"], "checkpoint": "base", "max_new_tokens": 2}
    r = httpx.post(s.url + "/v1/generate", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    ok = httpx.post(s.url + "/v1/generate", json=body, headers={"Authorization": "Bearer gen-secret"})
    assert ok.status_code == 200
    assert httpx.get(s.url + "/v1/checkpoints").status_code == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(s.url + path).status_code == 200


def test_async_generator_client(server):
    from shared.clients import AsyncGeneratorClient

    async def main():
        async with AsyncGeneratorClient(server.url) as client:
            bodies = await asyncio.gather(*(client.generate([p], checkpoint="base", do_sample=False,
                                                            max_new_tokens=8) for p in PROMPTS))
            return bodies, await client.checkpoints()

    bodies, listing = asyncio.run(main())
    assert [b["completions"][0]["prompt"] for b in bodies] == PROMPTS
    assert listing[0]["name"] == "base"
