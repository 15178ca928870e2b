"""Hostile input, endpoint by endpoint, against a real reward server: every case is a 4xx with the error envelope
(or a documented 2xx), never a 5xx, and the server keeps serving right after each one."""

from __future__ import annotations

import json

import httpx
import pytest

from services.reward.app import create_app
from tests.conftest import ServerThread
from tests.reliability.conftest import ADMIN_KEY, reward_settings

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JSON = {"content-type": "application/json"}
GOOD = {"texts": ["A fine film."]}


@pytest.fixture(scope="module")
def server(tiny_kit):
    s = ServerThread(create_app(reward_settings(tiny_kit, admin_api_key=ADMIN_KEY, max_text_chars=20_000))).start()
    yield s
    s.stop()


def body_cases(path: str) -> list[tuple[str, bytes | dict, set[int]]]:
    """(case, body, allowed statuses) for the two scoring endpoints."""
    cases = [
        ("empty list", {"texts": []}, {422}),
        ("empty string", {"texts": [""]}, {422}),
        ("number in texts", {"texts": [1]}, {422}),
        ("null in texts", {"texts": [None]}, {422}),
        ("nested list", {"texts": [["a"]]}, {422}),
        ("texts is a string", {"texts": "a"}, {422}),
        ("texts missing", {}, {422}),
        ("unknown field", {"texts": ["a"], "temperature": 1}, {422}),
        ("lone surrogate", b'{"texts": ["ok \\ud800 text"]}', {422}),
        ("lone low surrogate in label", b'{"texts": ["a"], "label": "\\udfff"}', {422}),
        ("unknown model", {"texts": ["a"], "model": "nope"}, {404}),
        ("unknown label", {"texts": ["a"], "label": "JOY"}, {422, 200} if path == "/v1/classify" else {422}),
        ("model is a number", {"texts": ["a"], "model": 3}, {422}),
        ("truncate is a string", {"texts": ["a"], "truncate": "maybe"}, {422}),
        ("too many texts", {"texts": ["a"] * 10_000}, {413}),
        ("text too long", {"texts": ["x" * 30_000]}, {413}),
        ("too long without truncation", {"texts": ["word " * 2000], "truncate": False}, {413}),
        ("malformed JSON", b'{"texts": ["a"', {400}),
        ("not JSON", b"texts=a", {400}),
        ("JSON array", b'["a"]', {422}),
        ("JSON null", b"null", {422}),
        ("NaN literal", b'{"texts": ["a"], "truncate": NaN}', {400, 422}),
        ("deeply nested", ("[" * 5000 + "]" * 5000).encode(), {400, 422}),
        ("control characters", {"texts": ["\x00\x01\x1b[31m"]}, {200}),
        ("only whitespace", {"texts": ["   \n\t"]}, {200}),
        ("emoji and RTL", {"texts": ["\U0001F600 \u202e\u05e9\u05dc\u05d5\u05dd"]}, {200}),
    ]
    return cases


def send(server, method: str, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.request(method, server.url + path, content=content, headers={**JSON, **(headers or {})}, timeout=60)


def assert_clean(r: httpx.Response, allowed: set[int], case: str) -> None:
    assert r.status_code in allowed, f"{case}: {r.status_code} {r.text[:300]}"
    assert r.status_code < 500
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["type"] and error["message"] and error["request_id"] == r.headers["x-request-id"], case


def still_serving(server) -> None:
    r = send(server, "POST", "/v1/score", GOOD)
    assert r.status_code == 200 and len(r.json()["scores"]) == 1


@pytest.mark.parametrize("path", ["/v1/score", "/v1/classify"])
def test_scoring_endpoints_answer_every_hostile_body_with_a_4xx(server, path):
    cases = body_cases(path)
    assert len(cases) >= 15
    for case, body, allowed in cases:
        assert_clean(send(server, "POST", path, body), allowed, case)
    still_serving(server)


def test_transport_level_abuse_is_refused_cleanly(server):
    url = server.url + "/v1/score"
    cases = [
        ("wrong content type",
         lambda: httpx.post(url, content=b'{"texts":["a"]}', headers={"content-type": "text/plain"}), {415}),
        ("form body", lambda: httpx.post(url, data={"texts": "a"}), {415}),
        ("body past the limit", lambda: httpx.post(url, content=b"x" * (5 << 20), headers=JSON), {413}),
        ("chunked body past the limit",
         lambda: httpx.post(url, content=(b"x" * 65536 for _ in range(80)), headers=JSON), {413}),
        ("chunked valid body", lambda: httpx.post(url, content=iter([b'{"texts": ', b'["a"]}']), headers=JSON),
         {200}),
        ("duplicate keys", lambda: httpx.post(url, content=b'{"texts":[1],"texts":["a"]}', headers=JSON), {200}),
        ("GET on a POST route", lambda: httpx.get(url), {405}),
        ("unknown route", lambda: httpx.get(server.url + "/v1/nothing"), {404}),
        ("path traversal", lambda: httpx.get(server.url + "/v1/../../etc/passwd"), {404}),
        ("huge header", lambda: httpx.post(url, json=GOOD, headers={"x-junk": "a" * 60_000}), {200, 400, 431}),
        ("bad bearer scheme", lambda: httpx.post(url, json=GOOD, headers={"Authorization": "Basic xyz"}), {200}),
        ("request id injection", lambda: httpx.post(url, json=GOOD, headers={"x-request-id": "a\tb c"}), {200}),
        ("query junk", lambda: httpx.post(url + "?model=../../x&debug=1", json=GOOD), {200}),
        ("OPTIONS", lambda: httpx.options(url), {405}),
        ("DELETE a scoring route", lambda: httpx.delete(url), {405}),
    ]
    for case, call, allowed in cases:
        r = call()
        assert r.status_code in allowed and r.status_code < 500, f"{case}: {r.status_code} {r.text[:200]}"
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
            assert r.json()["error"]["message"], case
    r = httpx.post(url, json=GOOD, headers={"x-request-id": "a\tb c"})
    assert r.headers["x-request-id"] != "a\tb c"  # an unsafe id is replaced, never echoed into logs
    still_serving(server)


def test_models_listing_refuses_abuse(server):
    url = server.url + "/v1/models"
    cases = [("POST", {}), ("PATCH", {}), ("DELETE", None), ("PUT", {}), ("POST", b"x" * 100)]
    for method, body in cases:
        r = httpx.request(method, url, **({"content": body} if isinstance(body, bytes) else {"json": body}))
        assert_clean(r, {405}, method)
    queries = ["?x=1", "?model=%00", "?" + "a=1&" * 2000, "?model=%ff%fe", "/", "?%00=%00", "?model=" + "a" * 7000,
               "#frag", "?model[]=a", "?=&=&", "?\u202e=1"]
    for q in queries:
        r = httpx.get(url + q)
        assert r.status_code in (200, 307, 404, 414) and r.status_code < 500, (q, r.status_code)
    wrong_key = httpx.get(url, headers={"Authorization": "Bearer " + "k" * 5000})
    assert wrong_key.status_code == 200  # no key configured: any header is ignored, never a crash
    listing = httpx.get(url).json()["models"]
    assert [m["name"] for m in listing] == ["sentiment"]
    assert len(cases) + len(queries) + 1 >= 15


def test_model_admin_refuses_every_hostile_request(server, tiny_kit, tmp_path):
    outside = tmp_path / "outside-model"
    outside.mkdir()
    link = tiny_kit / "link-out"
    link.unlink(missing_ok=True)
    link.symlink_to(tmp_path)
    try:
        cases = [
            ("name with slash", "a%2Fb", {"source": str(tiny_kit / "tiny-sentiment")}, {404, 422}),
            ("name too long", "a" * 65, {"source": str(tiny_kit / "tiny-sentiment")}, {422}),
            ("name with dots only", "..", {"source": str(tiny_kit / "tiny-sentiment")}, {404, 422}),
            ("name non-ASCII", "mod\u00e8le", {"source": str(tiny_kit / "tiny-sentiment")}, {422}),
            ("outside, existing", "x", {"source": str(outside)}, {403}),
            ("outside, missing", "x", {"source": str(tmp_path / "missing")}, {403}),
            ("system path", "x", {"source": "/etc"}, {403}),
            ("relative escape", "x", {"source": str(tiny_kit / ".." / ".." / "etc")}, {403}),
            ("symlink out of the folder", "x", {"source": str(link)}, {403}),
            ("hub id with hub off", "x", {"source": "bert-base-uncased"}, {403}),
            ("home dir", "x", {"source": "~root"}, {403}),
            ("NUL byte", "x", {"source": "/models/a\x00b"}, {403}),
            ("lone surrogate source", "x", b'{"source": "\\ud800"}', {422}),
            ("not a classifier", "x", {"source": str(tiny_kit / "tiny-gpt2")}, {422}),
            ("missing in the folder", "x", {"source": str(tiny_kit / "nothing-here")}, {422}),
            ("unknown label", "x", {"source": str(tiny_kit / "tiny-sentiment"), "label": "JOY"}, {422}),
            ("max_length too big", "x", {"source": str(tiny_kit / "tiny-sentiment"), "max_length": 10**9}, {422}),
            ("bad dtype", "x", {"source": str(tiny_kit / "tiny-sentiment"), "dtype": "int4"}, {422}),
            ("unknown field", "x", {"source": str(tiny_kit / "tiny-sentiment"), "trust_remote_code": True}, {422}),
            ("source missing", "x", {}, {422}),
        ]
        for case, name, body, allowed in cases:
            assert_clean(send(server, "PUT", f"/v1/models/{name}", body, ADMIN), allowed, case)
        existing = send(server, "PUT", "/v1/models/x", {"source": str(outside)}, ADMIN).json()["error"]
        missing = send(server, "PUT", "/v1/models/x", {"source": str(tmp_path / "missing")}, ADMIN).json()["error"]
        assert existing["message"].replace(str(outside), "P") == missing["message"].replace(
            str(tmp_path / "missing"), "P")  # the refusal says nothing about what exists
        deletes = [("unknown", "nope", ADMIN, {404}), ("bad name", "a" * 65, ADMIN, {422}),
                   ("non-ASCII", "\u00e8", ADMIN, {422}), ("without key", "sentiment", {}, {401}),
                   ("wrong key", "sentiment", {"Authorization": "Bearer nope"}, {401}),
                   ("basic auth", "sentiment", {"Authorization": "Basic YWRtaW46YWRtaW4="}, {401}),
                   ("key without scheme", "sentiment", {"Authorization": ADMIN_KEY}, {401}),
                   ("key with suffix", "sentiment", {"Authorization": f"Bearer {ADMIN_KEY}x"}, {401}),
                   ("dot name", ".hidden", ADMIN, {422}), ("dash first", "-x", ADMIN, {422}),
                   ("encoded slash", "a%2Fb", ADMIN, {404, 422}), ("traversal", "..%2F..%2Fetc", ADMIN, {404, 422}),
                   ("NUL", "a%00b", ADMIN, {422}), ("space", "a%20b", ADMIN, {422}),
                   ("huge name", "a" * 5000, ADMIN, {422})]
        for case, name, headers, allowed in deletes:
            assert_clean(httpx.delete(f"{server.url}/v1/models/{name}", headers=headers), allowed, case)
        assert len(cases) >= 15 and len(deletes) >= 15
    finally:
        link.unlink(missing_ok=True)
    assert [m["name"] for m in httpx.get(server.url + "/v1/models").json()["models"]] == ["sentiment"]
    still_serving(server)
