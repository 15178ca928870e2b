"""Property-based fuzzing of each service's own OpenAPI schema (schemathesis), against real uvicorn servers.

Every operation of `/openapi.json` gets `FUZZ_EXAMPLES` generated cases in each mode: positive (data that fits
the schema) and negative (data that breaks it); the body operations also get a `pinned` pass (positive data with
model / checkpoint / source names redrawn from real ones, so random parameters reach the models), and a few
hand-picked explicit cases run first. What must hold for every case:

* no 5xx (schemathesis's `not_a_server_error` check), and no error reported in-band in a 200 event stream;
* every 4xx carries the `{"error": {"type", "message"}}` envelope.

Generation is derandomized (the same cases every run). A longer local run: `RLHF_FUZZ_EXAMPLES=200 pytest ...`.
Per-operation counts are printed and written as JSON to the test's tmp dir (and to `$RLHF_FUZZ_REPORT_DIR` when
set).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup

from services.generator.app import create_app as create_generator_app
from services.reward.app import create_app as create_reward_app
from shared.checkpoints import write_checkpoint
from tests.conftest import ROOT
from tests.reliability.conftest import (
    ADMIN_KEY,
    CHECKPOINT,
    generator_settings,
    make_checkpoint_root,
    reward_settings,
)

pytestmark = pytest.mark.slow

# Known server errors, one entry per bug, so that the fuzz can keep running while a service is being fixed: service,
# method and path; `reproducer`, a minimal body (also sent as an explicit case); `matches`, the condition every
# failing body the fuzzer generated for this bug met; `bug`, what goes wrong. A 5xx whose request matches is reported
# as "known" and does not fail the test; an entry that no longer fails is printed as "stale". Keep it empty.
# Example: {"bug": "...", "service": "generator", "method": "POST", "path": "/v1/generate",
#           "reproducer": {"prompts": ["Hello"], "temperature": 5e-324}, "matches": lambda b: ...}
KNOWN_5XX: list[dict[str, Any]] = []

# The fuzzer is one sequential client: nothing else is in flight, so "overloaded" (429) is wrong too. Services whose
# 429s to it are a known bug: (text the 429's message contains, the bug); any other 429 fails the test. Keep it empty.
KNOWN_SEQUENTIAL_429: dict[str, tuple[str, str]] = {}

# 5xx this fuzzer found (and the services then fixed), as minimal reproducers sent as explicit cases on every run.
FOUND_5XX = [
    ("generator", "POST", "/v1/generate", "greedy decoding with num_return_sequences > 1 (transformers ValueError)",
     {"prompts": ["Hello"], "checkpoint": "base", "do_sample": False, "num_return_sequences": 2, "max_new_tokens": 2}),
    ("generator", "POST", "/v1/completions", "temperature 0 (greedy) with n > 1 (transformers ValueError)",
     {"model": "base", "prompt": "Hello", "temperature": 0, "n": 2, "max_tokens": 2}),
    ("generator", "POST", "/v1/generate", "tiny temperature: logits / T overflow, inf/nan probabilities",
     {"prompts": ["Hello"], "checkpoint": "base", "temperature": 5e-324, "max_new_tokens": 1}),
    ("generator", "POST", "/v1/completions", "tiny temperature on the OpenAI route",
     {"model": "base", "prompt": "Hello", "temperature": 1e-310, "max_tokens": 1}),
    ("generator", "POST", "/v1/completions", "tiny temperature streamed: a 200 whose events carry an error",
     {"model": "base", "prompt": "Hello", "temperature": 1e-310, "max_tokens": 1, "stream": True}),
]

FUZZ_EXAMPLES = int(os.environ.get("RLHF_FUZZ_EXAMPLES", "100"))  # per operation and per mode
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
HYPOTHESIS = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
                      verbosity=Verbosity.quiet, report_multiple_bugs=False)
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _label(case) -> str:
    return f"{case.method.upper()} {case.path}"


def _known(service: str, case) -> int | None:
    """The index of the KNOWN_5XX entry that `case` matches, or None."""
    body = _jsonable(case.body)
    for index, entry in enumerate(KNOWN_5XX):
        if (entry["service"], entry["method"], entry["path"]) != (service, case.method.upper(), case.formatted_path):
            continue
        if body == entry["reproducer"]:
            return index
        try:
            if isinstance(body, dict) and entry["matches"](body):
                return index
        except TypeError:  # a field of another type than the bug needs (negative data)
            continue
    return None


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _envelope_problem(response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return "the body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no `error` object"
    if not isinstance(error.get("type"), str) or not error["type"]:
        return "`error.type` is missing or not a string"
    if not isinstance(error.get("message"), str) or not error["message"]:
        return "`error.message` is missing or not a string"
    return None


def _in_band_error(response) -> str | None:
    """A streamed 200 whose events report an error: a server fault hidden behind the status line."""
    content_type = response.headers.get("content-type") or [""]  # schemathesis: lower-case keys, list values
    if "text/event-stream" not in (content_type if isinstance(content_type, str) else content_type[0]):
        return None
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            try:
                event = json.loads(line[6:])
            except ValueError:
                return f"an event is not JSON: {line[:200]!r}"
            if isinstance(event, dict) and "error" in event:
                return json.dumps(event["error"])[:500]
    return None


ABSENT = object()


def _redraw(body: Any, draw, **choices: list) -> None:
    """Replace (or drop, for ABSENT) each named field of a JSON object body with one of `choices`."""
    if not isinstance(body, dict):
        return
    for key, options in choices.items():
        value = draw(st.sampled_from(options))
        if value is ABSENT:
            body.pop(key, None)
        else:
            body[key] = value


def _clip_list(body: Any, key: str, most: int) -> None:
    if isinstance(body, dict) and isinstance(body.get(key), list):
        body[key] = body[key][:most] or body[key]


class Fuzzer:
    """Runs every operation of one service's schema in both modes, counting cases and collecting failures."""

    def __init__(self, service: str, base_url: str, headers: dict[str, str] | None = None):
        self.service, self.base_url, self.headers = service, base_url, headers or {}
        self.schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
        self.schema.config.output.sanitization.update(enabled=False)  # else `max_new_tokens` reads "[Filtered]"
        self.session = requests.Session()
        self.counts: dict[str, dict[str, int]] = {}
        self.failures: list[dict[str, Any]] = []
        self.known_hits: list[dict[str, Any]] = []
        self.known_used: set[int] = set()
        self.envelope: list[dict[str, Any]] = []
        self.operations: list[str] = []

    def _stats(self, label: str) -> dict[str, int]:
        return self.counts.setdefault(label, {"positive": 0, "negative": 0, "pinned": 0, "explicit": 0, "5xx": 0,
                                              "known_5xx": 0, "429": 0, "known_429": 0, "bad_envelope": 0,
                                              "statuses": {}})

    def _record(self, case, response, mode: str) -> None:
        stats = self._stats(_label(case))
        stats[mode] += 1
        status = response.status_code
        stats["statuses"][str(status)] = stats["statuses"].get(str(status), 0) + 1
        problem = None
        try:
            case.validate_response(response, checks=[not_a_server_error], headers=self.headers)
        except (AssertionError, FailureGroup):  # schemathesis's Failure / FailureGroup
            problem = f"not_a_server_error: HTTP {status}"
        if problem is None and status == 200:
            if (in_band := _in_band_error(response)) is not None:
                problem = f"error in a 200 event stream: {in_band}"
        if problem is not None:
            entry = self._reproducer(case, response, mode, problem)
            if (known := _known(self.service, case)) is not None:
                stats["known_5xx"] += 1
                self.known_used.add(known)
                entry["known_bug"] = KNOWN_5XX[known]["bug"]
                self.known_hits.append(entry)
            else:
                stats["5xx"] += 1
                self.failures.append(entry)
        elif status == 429:
            entry = self._reproducer(case, response, mode, "429 overloaded to a sequential client")
            known_text, known_bug = KNOWN_SEQUENTIAL_429.get(self.service, (None, None))
            if known_text is not None and known_text in response.text:
                stats["known_429"] += 1
                entry["known_bug"] = known_bug
                self.known_hits.append(entry)
            else:
                stats["429"] += 1
                self.failures.append(entry)
        if 400 <= status < 500 and (why := _envelope_problem(response)) is not None:
            stats["bad_envelope"] += 1
            self.envelope.append(self._reproducer(case, response, mode, f"4xx without the error envelope: {why}"))

    def _reproducer(self, case, response, mode: str, problem: str) -> dict[str, Any]:
        entry = {"service": self.service, "mode": mode, "method": case.method.upper(), "path": case.formatted_path,
                 "status": response.status_code, "problem": problem, "response": response.text[:600]}
        if case.query:
            entry["query"] = _jsonable(case.query)
        if case.body is not None and type(case.body).__name__ != "NotSet":
            entry["body"] = _jsonable(case.body)
        entry["curl"] = case.as_curl_command(headers=self.headers, base_url=self.base_url)
        return entry

    def call(self, case, mode: str) -> None:
        try:
            response = case.call(base_url=self.base_url, session=self.session, headers=self.headers, timeout=120)
        except requests.RequestException as exc:  # no answer at all (reset, server gone, timeout): a fault too
            self._stats(_label(case))[mode] += 1
            self.failures.append({"service": self.service, "mode": mode, "method": case.method.upper(),
                                  "path": case.formatted_path, "status": None, "body": _jsonable(case.body),
                                  "problem": f"no response: {type(exc).__name__}: {exc}"})
            return
        self._record(case, response, mode)

    def explicit(self, method: str, path: str, **kw) -> None:
        """A hand-picked case (real model folders, real checkpoint names): random data rarely hits them."""
        operation = self.schema[path][method]
        self.call(operation.Case(**kw), "explicit")

    def run(self, pins: dict[str, Callable] | None = None) -> None:
        """Both modes for every operation, plus a `pinned` pass for the operations in `pins`: positive cases whose
        names (model, checkpoint, source) are redrawn from real ones and sizes kept under the configured limits, so
        that the random sampling parameters and texts get past the lookups and reach the models."""
        pins = pins or {}
        for result in self.schema.get_all_operations():
            operation = result.ok()
            self.operations.append(operation.label)
            for mode in MODES:
                strategy = operation.as_strategy(generation_mode=mode)
                try:
                    self._fuzz_one(strategy, mode.value)
                except Unsatisfiable:  # nothing can be generated (e.g. negative data for an operation without inputs)
                    pass
            if (pin := pins.get(operation.label)) is not None:
                self._fuzz_one(operation.as_strategy(generation_mode=GenerationMode.POSITIVE), "pinned", pin)

    def _fuzz_one(self, strategy, mode: str, pin: Callable | None = None) -> None:
        @HYPOTHESIS
        @given(case=strategy, data=st.data())
        def fuzz_one(case, data) -> None:
            if pin is not None:
                pin(case, data.draw)
            self.call(case, mode)

        fuzz_one()

    def report(self, tmp_path: Path, seconds: float) -> dict[str, Any]:
        summary = {"service": self.service, "examples_per_mode": FUZZ_EXAMPLES, "seconds": round(seconds, 1),
                   "operations": self.counts, "failures": self.failures, "known_failures_hit": self.known_hits,
                   "bad_envelopes": self.envelope}
        text = json.dumps(summary, indent=1, default=str)
        (tmp_path / f"fuzz-{self.service}.json").write_text(text)
        if out := os.environ.get("RLHF_FUZZ_REPORT_DIR"):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"fuzz-{self.service}.json").write_text(text)
        print(f"\n== fuzz {self.service}: {seconds:.1f} s, {FUZZ_EXAMPLES} examples per operation and mode")
        for label, s in sorted(self.counts.items()):
            cases = s["positive"] + s["negative"] + s["pinned"] + s["explicit"]
            print(f"  {label:26s} cases {cases:4d} (pos {s['positive']}, neg {s['negative']}, pinned {s['pinned']}, "
                  f"explicit {s['explicit']})  5xx {s['5xx']} (known {s['known_5xx']})  429 {s['429']} (known "
                  f"{s['known_429']})  bad envelope {s['bad_envelope']}  statuses {s['statuses']}")
        stale = [k for i, k in enumerate(KNOWN_5XX) if k["service"] == self.service and i not in self.known_used]
        for entry in stale:
            print(f"  stale KNOWN_5XX entry (did not fail this run): {entry['method']} {entry['path']}: {entry['bug']}")
        return summary

    def check(self) -> None:
        unexercised = [op for op in self.operations if op not in self.counts]
        assert self.operations and not unexercised, f"operations never called: {unexercised or 'all (no schema)'}"
        generated = sum(s["positive"] + s["negative"] + s["pinned"] for s in self.counts.values())
        assert generated >= FUZZ_EXAMPLES, f"only {generated} generated cases on {self.service}: generation is broken"
        problems = self.failures + self.envelope
        assert not problems, f"{len(self.failures)} server errors or 429s, {len(self.envelope)} 4xx without the " \
            f"envelope on {self.service}:\n" + "\n".join(json.dumps(p, default=str)[:1500] for p in problems[:20])


def _fuzz(service: str, url: str, tmp_path: Path, explicit=(), headers=None, pins=None) -> Fuzzer:
    started = time.monotonic()
    fuzzer = Fuzzer(service, url, headers)
    for method, path, kw in explicit:
        fuzzer.explicit(method, path, **kw)
    fuzzer.run(pins)
    fuzzer.report(tmp_path, time.monotonic() - started)
    return fuzzer


def test_fuzz_reward_openapi(tiny_kit, serve, tmp_path):
    """With the admin key configured and sent, so PUT/DELETE /v1/models are fuzzed too; loads only from the kit."""
    server = serve(create_reward_app(reward_settings(tiny_kit, admin_api_key=ADMIN_KEY)))
    texts = ["A wonderful film.", "Dull and far too long."]
    explicit = [
        ("POST", "/v1/score", {"body": {"texts": texts}}),
        ("POST", "/v1/score", {"body": {"texts": texts, "label": "NEGATIVE", "truncate": False}}),
        ("POST", "/v1/score", {"body": {"texts": ["x" * 5000], "truncate": False}}),
        ("POST", "/v1/classify", {"body": {"texts": texts, "model": "sentiment"}}),
        ("PUT", "/v1/models/{name}", {"path_parameters": {"name": "three"},
                                       "body": {"source": str(tiny_kit / "tiny-sentiment-3"), "label": "positive"}}),
        ("PUT", "/v1/models/{name}", {"path_parameters": {"name": "three"},
                                       "body": {"source": str(tiny_kit / "tiny-sentiment"), "score": "logit"}}),
        ("PUT", "/v1/models/{name}", {"path_parameters": {"name": "policy"},
                                       "body": {"source": str(tiny_kit / "tiny-gpt2")}}),
        ("PUT", "/v1/models/{name}", {"path_parameters": {"name": "outside"}, "body": {"source": "/etc"}}),
        ("POST", "/v1/score", {"body": {"texts": texts, "model": "three"}}),
        ("DELETE", "/v1/models/{name}", {"path_parameters": {"name": "sentiment"}}),  # the default: 409
        ("DELETE", "/v1/models/{name}", {"path_parameters": {"name": "three"}}),
    ]
    names = ["sentiment", "three", "extra"]
    sources = [str(tiny_kit / d) for d in ("tiny-sentiment", "tiny-sentiment-3", "tiny-gpt2", "corpus", "")]

    def pin_score(case, draw):
        _redraw(case.body, draw, model=[ABSENT, None, *names], label=[ABSENT, None, "POSITIVE", "NEGATIVE", "positive"])

    def pin_put(case, draw):
        case.path_parameters["name"] = draw(st.sampled_from(names))
        _redraw(case.body, draw, source=sources)

    def pin_delete(case, draw):
        case.path_parameters["name"] = draw(st.sampled_from(names))

    pins = {"POST /v1/score": pin_score, "POST /v1/classify": pin_score, "PUT /v1/models/{name}": pin_put,
            "DELETE /v1/models/{name}": pin_delete}
    fuzzer = _fuzz("reward", server.url, tmp_path, explicit, headers=ADMIN, pins=pins)
    # Still serving after all that: put the default model back (the fuzzer may have removed every model).
    put = httpx.put(server.url + "/v1/models/sentiment", headers=ADMIN, timeout=60,
                    json={"source": str(tiny_kit / "tiny-sentiment"), "default": True})
    assert put.status_code in (200, 201), put.text
    after = httpx.post(server.url + "/v1/score", json={"texts": texts}, timeout=60)
    assert after.status_code == 200 and len(after.json()["scores"]) == 2, after.text
    fuzzer.check()


def test_fuzz_generator_openapi(tiny_kit, serve, tmp_path):
    """The tiny policy as `base` and one real checkpoint, `run/step-1`; small limits keep each case cheap."""
    root = make_checkpoint_root(tiny_kit, tmp_path / "checkpoints")
    write_checkpoint(root, "run", 2, lambda tmp: shutil.copytree(tiny_kit / "tiny-gpt2", tmp, dirs_exist_ok=True))
    server = serve(create_generator_app(generator_settings(  # one checkpoint in memory: switching evicts
        tiny_kit, root, max_prompts_per_request=4, max_new_tokens_limit=16, max_num_return_sequences=3,
        max_prompt_tokens=64, max_loaded_checkpoints=1)))
    explicit = [
        ("POST", "/v1/generate", {"body": {"prompts": ["I watched The"], "checkpoint": CHECKPOINT,
                                           "do_sample": False, "max_new_tokens": 8}}),
        ("POST", "/v1/generate", {"body": {"prompts": ["", "Hello"], "checkpoint": "latest", "seed": 3,
                                           "num_return_sequences": 2, "max_new_tokens": 4, "stop": ["."]}}),
        ("POST", "/v1/generate", {"body": {"prompts": ["x"], "checkpoint": "run/step-999"}}),
        ("POST", "/v1/generate", {"body": {"prompts": ["x"], "checkpoint": "../../etc/step-1"}}),
        ("POST", "/v1/completions", {"body": {"model": CHECKPOINT, "prompt": ["A", "B"], "max_tokens": 4,
                                              "stream": True, "n": 2, "temperature": 0}}),
        ("POST", "/v1/completions", {"body": {"model": "base", "prompt": "The film", "max_tokens": 4,
                                              "echo": True, "stop": "."}}),
        ("GET", "/v1/checkpoints", {}),
        *[(method, path, {"body": body}) for service, method, path, _, body in FOUND_5XX if service == "generator"],
        *[(k["method"], k["path"], {"body": k["reproducer"]}) for k in KNOWN_5XX if k["service"] == "generator"],
    ]
    checkpoints = ["base", "latest", CHECKPOINT, "run/step-2"]

    def pin_generate(case, draw):
        _redraw(case.body, draw, checkpoint=[ABSENT, *checkpoints], max_new_tokens=[ABSENT, 1, 2, 5, 16],
                num_return_sequences=[ABSENT, 1, 3])
        _clip_list(case.body, "prompts", 4)

    def pin_completions(case, draw):
        _redraw(case.body, draw, model=[ABSENT, *checkpoints], max_tokens=[ABSENT, 1, 3, 16], n=[ABSENT, 1, 2],
                logprobs=[ABSENT, None], best_of=[ABSENT, None, 1])
        _clip_list(case.body, "prompt", 4)

    pins = {"POST /v1/generate": pin_generate, "POST /v1/completions": pin_completions}
    fuzzer = _fuzz("generator", server.url, tmp_path, explicit, pins=pins)
    fuzzer.check()


def test_fuzz_trainer_openapi(tiny_kit, serve, tmp_path):
    """A real (short) PPO job whose reward comes from a real reward server over HTTP; its routes are fuzzed while
    it runs and after (the fuzzer's POST /v1/stop ends it early)."""
    from services.trainer.app import create_app as create_trainer_app  # here: a trainer import error fails only this
    from services.trainer.config import load_config

    reward = serve(create_reward_app(reward_settings(tiny_kit)))
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={tmp_path / 'runs'}",
        "train.total_steps=2", "train.batch_size=8", "method.num_rollouts=8", "method.chunk_size=8",
        "method.ppo_epochs=1", "method.gen_kwargs.max_new_tokens=8", "data.eval_prompts=4",
        "train.eval_samples_per_prompt=1", "train.tensorboard=false", f"reward.url={reward.url}",
        "reward.wait_ready_s=30"])
    app = create_trainer_app(config)
    server = serve(app, timeout=120)
    explicit = [("GET", "/v1/metrics", {"query": {"since": 1}}), ("GET", "/v1/status", {})]
    fuzzer = _fuzz("trainer", server.url, tmp_path, explicit)
    assert app.state.done.wait(120), "the job did not end"
    assert app.state.status.state in ("finished", "stopped"), app.state.status.as_dict()
    fuzzer.check()
