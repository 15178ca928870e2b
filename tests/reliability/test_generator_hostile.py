"""Hostile input for every generator route, table-driven, against a real server with the tiny policy.

Each case asserts the status (a 4xx with the error envelope, or a documented 2xx), never a 5xx, and that the
service still serves a normal request afterwards. `/v1/checkpoints` cases are hostile folders and manifests on disk
(what a client of that route cannot control, but a broken trainer or a full disk can) plus hostile HTTP.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx
import pytest

from services.generator.app import create_app
from tests.conftest import ServerThread
from tests.reliability.conftest import generator_settings, make_checkpoint_root

pytestmark = pytest.mark.slow
OK = {200}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_kit, tmp_path_factory):
    root = make_checkpoint_root(tiny_kit, tmp_path_factory.mktemp("checkpoints"))
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "run" / "step-1", outside / "step-1")
    (root / "escape").symlink_to(outside)  # a run and a step that lead out of the root: never listed or served
    (root / "run" / "step-7").symlink_to(outside / "step-1")
    s = ServerThread(create_app(generator_settings(tiny_kit, root))).start()
    s.root, s.outside = root, outside
    yield s
    s.stop()


def assert_outcome(r: httpx.Response, expected: set[int]) -> None:
    assert r.status_code < 500, r.text
    assert r.status_code in expected, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"]
        assert len(error["message"]) < 2000  # hostile input is never echoed back in full


def assert_serving(url: str) -> None:
    r = httpx.post(url + "/v1/generate", json={"prompts": ["fine"], "checkpoint": "base", "max_new_tokens": 2})
    assert r.status_code == 200, r.text


def raw(text: str) -> dict:
    """A body sent byte for byte (NaN, lone surrogates, huge numbers: what json= would refuse or rewrite)."""
    return {"content": text.encode(), "headers": JSON}


# -- /v1/generate ---------------------------------------------------------------------------------------------------

P = '"prompts": ["I watched The"], "checkpoint": "base", "max_new_tokens": 4'
GENERATE = {
    "greedy with several sequences": ({"json": {"prompts": ["a"], "do_sample": False, "num_return_sequences": 3}},
                                      OK),
    "denormal temperature": (raw(f'{{{P}, "temperature": 5e-324}}'), OK),
    "temperature below 1e-5": (raw(f'{{{P}, "temperature": 1e-7, "num_return_sequences": 2}}'), OK),
    "NaN temperature": (raw(f'{{{P}, "temperature": NaN}}'), {422}),
    "infinite temperature": (raw(f'{{{P}, "temperature": Infinity}}'), {422}),
    "denormal top_p": (raw(f'{{{P}, "top_p": 5e-324}}'), OK),
    "huge top_k": (raw(f'{{{P}, "top_k": {10**30}}}'), {200, 422}),
    "seed past 64 bits": (raw(f'{{{P}, "seed": {2**64}}}'), {422}),
    "negative seed": (raw(f'{{{P}, "seed": -1}}'), {422}),
    "max_new_tokens 1e400": (raw('{"prompts": ["a"], "checkpoint": "base", "max_new_tokens": 1e400}'), {422}),
    "lone surrogate prompt": (raw('{"prompts": ["ab\\ud800"], "checkpoint": "base"}'), {422}),
    "lone surrogate checkpoint": (raw('{"prompts": ["a"], "checkpoint": "run/\\udfff"}'), {422}),
    "lone surrogate stop": (raw(f'{{{P}, "stop": ["\\udc00"]}}'), {422}),
    "fullwidth step digits": ({"json": {"prompts": ["a"], "checkpoint": "run/step-\uff11"}}, {404}),
    "leading-zero step": ({"json": {"prompts": ["a"], "checkpoint": "run/step-01"}}, {404}),
    "arabic-indic step digits": ({"json": {"prompts": ["a"], "checkpoint": "run/step-\u0661"}}, {404}),
    "huge checkpoint name": ({"json": {"prompts": ["a"], "checkpoint": "r" * 100_000 + "/step-1"}}, {404, 422}),
    "symlink run out of the root": ({"json": {"prompts": ["a"], "checkpoint": "escape/step-1"}}, {404}),
    "too many stop strings": ({"json": {"prompts": ["a"], "checkpoint": "base", "stop": ["x"] * 1000}}, {422}),
    "huge stop string": ({"json": {"prompts": ["a"], "checkpoint": "base", "stop": ["x" * 100_000]}}, {422}),
    "empty stop string": ({"json": {"prompts": ["a"], "checkpoint": "base", "stop": [""], "max_new_tokens": 3}},
                          OK),
    "NUL and EOS text in prompt": ({"json": {"prompts": ["\x00", "<|endoftext|>", ""], "checkpoint": "base",
                                             "max_new_tokens": 3}}, OK),
    "body is a list": ({"json": [{"prompts": ["a"]}]}, {422}),
    "body is null": (raw("null"), {422}),
    "body is not JSON": (raw("{prompts: [a]"), {400}),
    "deeply nested body": (raw("[" * 100_000 + "]" * 100_000), {400, 413, 422}),
    "text/plain body": ({"content": b'{"prompts": ["a"]}', "headers": {"content-type": "text/plain"}}, {415}),
    "zero sequences": ({"json": {"prompts": ["a"], "checkpoint": "base", "num_return_sequences": 0}}, {422}),
    "prompt of a bool": ({"json": {"prompts": [True], "checkpoint": "base"}}, {422}),
    "checkpoint of a number": ({"json": {"prompts": ["a"], "checkpoint": 1}}, {422}),
    "top_k of a string": ({"json": {"prompts": ["a"], "checkpoint": "base", "top_k": "many"}}, {422}),
}


@pytest.mark.parametrize("case", list(GENERATE))
def test_generate_hostile(server, case):
    kwargs, expected = GENERATE[case]
    assert_outcome(httpx.post(server.url + "/v1/generate", timeout=60, **kwargs), expected)
    assert_serving(server.url)


def test_greedy_sequences_are_identical_and_tiny_temperatures_are_greedy(server):
    body = {"prompts": ["I watched The"], "checkpoint": "base", "max_new_tokens": 12}
    greedy = httpx.post(server.url + "/v1/generate", json={**body, "do_sample": False}).json()["completions"]
    for extra in ({"do_sample": False, "num_return_sequences": 3}, {"temperature": 5e-324},
                  {"temperature": 1e-6, "num_return_sequences": 2}):
        out = httpx.post(server.url + "/v1/generate", json={**body, **extra}).json()["completions"]
        assert {c["text"] for c in out} == {greedy[0]["text"]}, extra
        assert len(out) == extra.get("num_return_sequences", 1)


# -- /v1/completions, batched and streamed --------------------------------------------------------------------------

C = '"model": "base", "prompt": "I watched The", "max_tokens": 4'
COMPLETIONS = {
    "greedy with n > 1": ({"model": "base", "prompt": "a", "max_tokens": 4, "temperature": 0, "n": 3}, OK),
    "denormal temperature": (f'{{{C}, "temperature": 5e-324}}', OK),
    "temperature below 1e-5": (f'{{{C}, "temperature": 1e-6, "n": 2}}', OK),
    "NaN temperature": (f'{{{C}, "temperature": NaN}}', {422}),
    "temperature over 2": (f'{{{C}, "temperature": 2.5}}', {422}),
    "too many stop strings": ({"model": "base", "prompt": "a", "stop": ["x"] * 1000}, {422}),
    "huge stop string": ({"model": "base", "prompt": "a", "stop": "x" * 100_000}, {422}),
    "huge stop in a list": ({"model": "base", "prompt": "a", "stop": ["x" * 100_000]}, {422}),
    "leading-zero step": ({"model": "run/step-01", "prompt": "a"}, {404}),
    "fullwidth step digits": ({"model": "run/step-\uff11", "prompt": "a"}, {404}),
    "path traversal model": ({"model": "../run/step-1", "prompt": "a"}, {404}),
    "symlink step out of the root": ({"model": "run/step-7", "prompt": "a"}, {404}),
    "empty prompt list": ({"model": "base", "prompt": []}, {422}),
    "token-id prompt": ({"model": "base", "prompt": [[1, 2, 3]]}, {422}),
    "lone surrogate prompt": ('{"model": "base", "prompt": "\\ud83d"}', {422}),
    "lone surrogate model": ('{"model": "\\ud83d", "prompt": "a"}', {422}),
    "logprobs": ({"model": "base", "prompt": "a", "logprobs": 1}, OK),
    "logprobs past 5": ({"model": "base", "prompt": "a", "logprobs": 6}, {422}),
    "logprobs true": ({"model": "base", "prompt": "a", "logprobs": True}, {422}),
    "logprobs NaN": (f'{{{C}, "logprobs": NaN}}', {422}),
    "echo, logprobs 5, empty prompt": ({"model": "base", "prompt": "", "echo": True, "logprobs": 5, "n": 2}, OK),
    "score only (max_tokens 0, echo)": ({"model": "base", "prompt": ["a", "bc"], "max_tokens": 0, "echo": True,
                                         "logprobs": 2}, OK),
    "max_tokens 0 without echo": ({"model": "base", "prompt": "a", "max_tokens": 0}, {422}),
    "best_of": ({"model": "base", "prompt": "a", "best_of": 3}, {400}),
    "best_of equal to n": ({"model": "base", "prompt": "a", "best_of": 2, "n": 2, "max_tokens": 2}, OK),
    "suffix": ({"model": "base", "prompt": "a", "suffix": "b"}, {400}),
    "unknown field": ({"model": "base", "prompt": "a", "top_a": 0.1}, {400}),
    "unknown field of null": ({"model": "base", "prompt": "a", "beams": None}, {400}),
    "huge unknown field name": ({"model": "base", "prompt": "a", "x" * 100_000: 1}, {400}),
    "a thousand unknown fields": ({"model": "base", "prompt": "a", **{f"f{i}": i for i in range(1000)}}, {400}),
    "every field null": ({k: None for k in ("model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n",
                                            "seed", "stop", "stream_options", "echo", "logprobs", "best_of",
                                            "presence_penalty", "frequency_penalty", "logit_bias", "user",
                                            "top_k", "min_p", "repetition_penalty", "min_tokens")}, OK),
    "huge top_k": (f'{{{C}, "top_k": {10**30}}}', {422}),
    "largest top_k": (f'{{{C}, "top_k": {2**31 - 1}, "temperature": 0.5}}', OK),
    "denormal repetition_penalty": (f'{{{C}, "repetition_penalty": 5e-324}}', {422}),
    "largest repetition_penalty": (f'{{{C}, "repetition_penalty": 100, "n": 2}}', OK),
    "NaN presence_penalty": (f'{{{C}, "presence_penalty": NaN}}', {422}),
    "infinite frequency_penalty": (f'{{{C}, "frequency_penalty": -Infinity}}', {422}),
    "every penalty at its bound": (f'{{{C}, "presence_penalty": -2, "frequency_penalty": 2, '
                                   '"repetition_penalty": 0.01, "min_p": 1, "top_k": -1, "logprobs": 5}', OK),
    "min_tokens past max_tokens": (f'{{{C}, "min_tokens": 5}}', {422}),
    "min_tokens with a stop": (f'{{{C}, "min_tokens": 4, "stop": [" ", "e"], "logprobs": 0}}', OK),
    "logit_bias past the vocabulary": ({"model": "base", "prompt": "a", "logit_bias": {"999999999": 1}}, {400}),
    "logit_bias key not a number": ({"model": "base", "prompt": "a", "logit_bias": {"-1": 1}}, {422}),
    "logit_bias NaN": (f'{{{C}, "logit_bias": {{"1": NaN}}}}', {422}),
    "logit_bias of 1000 tokens": ({"model": "base", "prompt": "a", "logit_bias": {str(i): 1 for i in range(1000)}},
                                  {422}),
    "logit_bias at its bounds": ({"model": "base", "prompt": "a", "max_tokens": 3, "temperature": 0, "logprobs": 1,
                                  "logit_bias": {"0": -100, "1": 100, "2": -100}}, OK),
    "stream_options": ({"model": "base", "prompt": "a", "max_tokens": 2, "stream_options": {"include_usage": True}},
                       {200, 400}),
    "stream_options unknown key": ({"model": "base", "prompt": "a", "stream_options": {"x": 1}}, {422}),
    "stream_options not an object": ({"model": "base", "prompt": "a", "stream_options": "yes"}, {422}),
    "n zero": ({"model": "base", "prompt": "a", "n": 0}, {422}),
    "n past the limit": ({"model": "base", "prompt": "a", "n": 1000}, {422}),
    "max_tokens past the limit": ({"model": "base", "prompt": "a", "max_tokens": 10**9}, {422}),
    "negative seed": ({"model": "base", "prompt": "a", "seed": -1}, {422}),
    "prompt too long": ({"model": "base", "prompt": "word " * 600}, {413}),
    "past the context": ({"model": "base", "prompt": "word " * 200, "max_tokens": 200}, {422}),
    "unknown model": ({"model": "nope/step-1", "prompt": "a"}, {404}),
    "echo of an empty prompt": ({"model": "base", "prompt": "", "echo": True, "max_tokens": 2}, OK),
    "largest seed with n > 1": ({"model": "base", "prompt": "a", "seed": 2**63 - 1, "n": 3, "max_tokens": 2}, OK),
    "stop list of a number": ({"model": "base", "prompt": "a", "stop": [1]}, {422}),
}


def post_completion(url: str, body, stream: bool) -> httpx.Response:
    if isinstance(body, str):
        text = body[:-1] + f', "stream": {json.dumps(stream)}}}'
        return httpx.post(url + "/v1/completions", timeout=60, **raw(text))
    return httpx.post(url + "/v1/completions", json={**body, "stream": stream}, timeout=60)


def sse_events(r: httpx.Response) -> list:
    lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", r.text
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("stream", [False, True], ids=["batched", "streamed"])
@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_completions_hostile(server, case, stream):
    body, expected = COMPLETIONS[case]
    r = post_completion(server.url, body, stream)
    assert_outcome(r, expected)
    if r.status_code == 200 and stream:
        assert all("error" not in e for e in sse_events(r)), r.text
    assert_serving(server.url)


def test_streamed_and_batched_greedy_choices_agree(server):
    body = {"model": "base", "prompt": ["I watched The", "This"], "max_tokens": 10, "temperature": 0, "n": 2}
    batched = httpx.post(server.url + "/v1/completions", json=body).json()["choices"]
    streamed: dict[int, str] = {}
    for event in sse_events(httpx.post(server.url + "/v1/completions", json={**body, "stream": True})):
        for c in event["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert streamed == {c["index"]: c["text"] for c in batched}
    assert batched[0]["text"] == batched[1]["text"] and batched[2]["text"] == batched[3]["text"]


# -- /v1/checkpoints: hostile folders and manifests, and hostile HTTP -----------------------------------------------

def _manifest(text: str):
    def make(root: Path, outside: Path, run: Path) -> None:
        shutil.copytree(root / "run" / "step-1", run / "step-1")
        (run / "step-1" / "manifest.json").write_text(text)
    return make


def _step_named(name: str):
    def make(root: Path, outside: Path, run: Path) -> None:
        shutil.copytree(root / "run" / "step-1", run / name)
    return make


def _symlinked_step(root: Path, outside: Path, run: Path) -> None:
    run.mkdir()
    (run / "step-1").symlink_to(outside / "step-1")


def _symlinked_run(root: Path, outside: Path, run: Path) -> None:
    run.symlink_to(outside)


def _symlinked_weights(root: Path, outside: Path, run: Path) -> None:
    shutil.copytree(root / "run" / "step-1", run / "step-1")
    (run / "step-1" / "model.safetensors").unlink()
    (run / "step-1" / "model.safetensors").symlink_to(outside / "step-1" / "model.safetensors")


def _broken_symlink_step(root: Path, outside: Path, run: Path) -> None:
    run.mkdir()
    (run / "step-1").symlink_to(outside / "missing")


def _file_as_step(root: Path, outside: Path, run: Path) -> None:
    run.mkdir()
    (run / "step-1").write_text("not a folder")


def _file_as_run(root: Path, outside: Path, run: Path) -> None:
    run.write_text("not a folder")


def _manifest_folder(root: Path, outside: Path, run: Path) -> None:
    shutil.copytree(root / "run" / "step-1", run / "step-1")
    (run / "step-1" / "manifest.json").unlink()
    (run / "step-1" / "manifest.json").mkdir()


def _huge_manifest(root: Path, outside: Path, run: Path) -> None:
    _manifest('{"step": 1, "metrics": {"x": "' + "y" * 3_000_000 + '"}}')(root, outside, run)


# Each builds the run folder `run`; the listing must stay a 200 of valid JSON with that run absent or invalid.
FOLDERS = {
    "manifest is a list": _manifest("[1, 2]"),
    "manifest is a string": _manifest('"step-1"'),
    "manifest is not JSON": _manifest("\x00\xff garbage"),
    "NaN time": _manifest('{"step": 1, "time": NaN}'),
    "infinite time as text": _manifest('{"step": 1, "time": "inf"}'),
    "NaN metric": _manifest('{"step": 1, "time": 1.0, "metrics": {"reward": NaN, "kl": -Infinity}}'),
    "metrics a list": _manifest('{"step": 1, "time": 1.0, "metrics": [1, 2]}'),
    "step 1e400": _manifest('{"step": 1e400, "time": 1.0}'),
    "step a string": _manifest('{"step": "one", "time": 1.0}'),
    "step a huge integer": _manifest('{"step": ' + "9" * 5000 + ', "time": 1.0}'),
    "deeply nested manifest": _manifest('{"step": 1, "metrics": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"),
    "manifest a folder": _manifest_folder,
    "manifest of 3 MB": _huge_manifest,
    "step folder a symlink out of the root": _symlinked_step,
    "run folder a symlink out of the root": _symlinked_run,
    "weights a symlink out of the root": _symlinked_weights,
    "broken symlink step": _broken_symlink_step,
    "file named like a step": _file_as_step,
    "file named like a run": _file_as_run,
    "leading-zero step folder": _step_named("step-01"),
    "fullwidth-digit step folder": _step_named("step-\uff11"),
}


SERVABLE = {"NaN metric"}  # a diverged run's metrics are data (listed as null); its weights decide


def _no_nan(token: str):
    raise ValueError(f"{token} is not JSON")


@pytest.mark.parametrize("case", list(FOLDERS))
def test_checkpoints_listing_survives_hostile_folders(server, case):
    run = server.root / f"hostile-{abs(hash(case)) % 10**8}"
    FOLDERS[case](server.root, server.outside, run)
    try:
        r = httpx.get(server.url + "/v1/checkpoints", timeout=60)
        assert_outcome(r, OK)
        listing = json.loads(r.text, parse_constant=_no_nan)["checkpoints"]
        mine = [c for c in listing if c["name"].startswith(run.name + "/")]
        if case in SERVABLE:
            assert [c["valid"] for c in mine] == [True]
        else:
            assert all(not c["valid"] and c["error"] for c in mine), mine
        assert all(c["time"] is None or math.isfinite(c["time"]) for c in listing)
        r = httpx.post(server.url + "/v1/generate", json={"prompts": ["a"], "checkpoint": f"{run.name}/step-1",
                                                          "max_new_tokens": 2})
        assert_outcome(r, OK if case in SERVABLE else {404, 409})
        latest = httpx.post(server.url + "/v1/generate", json={"prompts": ["a"], "max_new_tokens": 2})
        assert latest.status_code == 200, latest.text
        assert latest.json()["checkpoint"] == "run/step-1" or case in SERVABLE
    finally:
        if run.is_symlink() or run.is_file():
            run.unlink()
        else:
            shutil.rmtree(run)


CHECKPOINTS_HTTP = {
    "POST": ("POST", {"json": {}}, {405}),
    "PUT": ("PUT", {"json": {}}, {405}),
    "DELETE": ("DELETE", {}, {405}),
    "PATCH": ("PATCH", {"json": {}}, {405}),
    "junk query": ("GET", {"params": {"x": "\x00\uffff", "limit": "-1"}}, OK),
    "GET with a body": ("GET", {"content": b"\xff" * 1000, "headers": {"content-type": "text/plain"}}, OK),
    "garbage Authorization": ("GET", {"headers": {"authorization": b"Bearer \xff\xfe" + b"x" * 5000}}, OK),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS_HTTP))
def test_checkpoints_hostile_http(server, case):
    method, kwargs, expected = CHECKPOINTS_HTTP[case]
    assert_outcome(httpx.request(method, server.url + "/v1/checkpoints", **kwargs), expected)
    assert_serving(server.url)


# -- paths and operational routes -----------------------------------------------------------------------------------

ROUTES = {
    "POST /healthz": ("POST", "/healthz", {}, {405}),
    "POST /readyz": ("POST", "/readyz", {}, {405}),
    "DELETE /metrics": ("DELETE", "/metrics", {}, {405}),
    "GET /v1/generate": ("GET", "/v1/generate", {}, {405}),
    "PUT /v1/completions": ("PUT", "/v1/completions", {"json": {}}, {405}),
    "POST /v1/models": ("POST", "/v1/models", {"json": {}}, {405}),
    "DELETE /v1/models/base": ("DELETE", "/v1/models/base", {}, {405}),
    "model id traversal": ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", {}, {404}),
    "model id of a symlinked step": ("GET", "/v1/models/run/step-7", {}, {404}),
    "model id with NUL": ("GET", "/v1/models/run%00/step-1", {}, {404}),
    "model id of invalid UTF-8": ("GET", "/v1/models/%ff%fe/step-1", {}, {404}),
    "8 kB model id": ("GET", "/v1/models/" + "a" * 8000, {}, {404}),
    "model id with a query": ("GET", "/v1/models/base?x=%00", {}, OK),
    "empty model id": ("GET", "/v1/models/", {}, {404}),
    "OPTIONS /v1/generate": ("OPTIONS", "/v1/generate", {}, {405}),
    "HEAD /healthz": ("HEAD", "/healthz", {}, {200, 405}),
    "unknown /v1 route": ("GET", "/v1/nope", {}, {404}),
    "encoded traversal": ("GET", "/%2e%2e/%2e%2e/etc/passwd", {}, {404}),
    "NUL in the path": ("GET", "/v1/checkpoints%00", {}, {404}),
    "invalid UTF-8 in the path": ("GET", "/v1/%ff%fe", {}, {404}),
    "8 kB path": ("GET", "/" + "a" * 8000, {}, {404}),
    "hostile x-request-id": ("GET", "/healthz", {"headers": {"x-request-id": b"\xff<script>" * 30}}, OK),
    "body over the limit": ("POST", "/v1/generate", {"content": b"{" + b" " * (5 * 2**20) + b"}",
                                                    "headers": JSON}, {413}),
    "chunked body over the limit": ("POST", "/v1/generate", {"content": iter([b" " * 2**20] * 5), "headers": JSON},
                                    {413}),
    "empty POST body": ("POST", "/v1/generate", {"headers": JSON}, {400, 422}),
    "query string on generate": ("POST", "/v1/generate?checkpoint=../x",
                                 {"json": {"prompts": ["a"], "checkpoint": "base", "max_new_tokens": 2}}, OK),
}


@pytest.mark.parametrize("case", list(ROUTES))
def test_routes_hostile(server, case):
    method, path, kwargs, expected = ROUTES[case]
    r = httpx.request(method, server.url + path, timeout=60, **kwargs)
    if r.status_code >= 400 and method == "HEAD":
        assert r.status_code < 500
    else:
        assert_outcome(r, expected)
    assert r.headers.get("x-request-id")
    assert_serving(server.url)


def test_symlinked_checkpoints_are_not_served(server):
    listing = {c["name"] for c in httpx.get(server.url + "/v1/checkpoints").json()["checkpoints"]}
    assert not {"escape/step-1", "run/step-7"} & listing and "run/step-1" in listing
    for name in ("escape/step-1", "run/step-7"):
        r = httpx.post(server.url + "/v1/generate", json={"prompts": ["a"], "checkpoint": name})
        assert r.status_code == 404, r.text


@pytest.mark.parametrize("name", ["run/step-01", "run/step-\uff11", "run/step-\u0661", "run/step-1\n"])
def test_non_canonical_names_are_refused_with_the_reason(server, name):
    r = httpx.post(server.url + "/v1/generate", json={"prompts": ["a"], "checkpoint": name})
    assert r.status_code == 404, r.text
    assert "ASCII digits without leading zeros" in r.json()["error"]["message"]
