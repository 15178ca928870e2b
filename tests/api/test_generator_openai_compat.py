"""The generator's OpenAI compatibility, through the `openai` package against a real server with the tiny policy:
`/v1/models`, `logprobs` (checked against the model in-process), `echo`, streaming, and every completions parameter
either honoured or refused with a 4xx that names it."""

from __future__ import annotations

import json
import math
import shutil

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.generator.app import create_app
from services.generator.settings import GeneratorSettings
from shared.checkpoints import write_checkpoint
from tests.conftest import ServerThread

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

PROMPTS = ["I watched The", "The story follows a young", "This"]
TOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny_kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for step in (1, 2):
        write_checkpoint(root, "run", step, lambda tmp: shutil.copytree(tiny_kit / "tiny-gpt2", tmp,
                                                                          dirs_exist_ok=True))

    def weights_only(tmp):  # no tokenizer files: listed by /v1/checkpoints as invalid, never servable
        for name in ("config.json", "model.safetensors"):
            shutil.copy(tiny_kit / "tiny-gpt2" / name, tmp / name)

    write_checkpoint(root, "broken", 1, weights_only)
    settings = GeneratorSettings(model=str(tiny_kit / "tiny-gpt2"), checkpoints=root, port=0, device="cpu",
                                 torch_threads=1)
    s = ServerThread(create_app(settings)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny(tiny_kit):
    model = AutoModelForCausalLM.from_pretrained(tiny_kit / "tiny-gpt2").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_kit / "tiny-gpt2")
    return model, tokenizer


def raw_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V): log-softmax of the model's logits at each position, predicting the next token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def sse(r: httpx.Response) -> list[dict]:
    lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", r.text
    return [json.loads(line) for line in lines[:-1]]


# -- /v1/models -----------------------------------------------------------------------------------------------------

def test_models_list_and_retrieve(server, client):
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    assert ids == ["base", "latest", "run/step-1", "run/step-2"]  # the broken checkpoint is not servable
    assert all(m.object == "model" and isinstance(m.created, int) and m.created > 0 and m.owned_by
               for m in listed.data)
    body = httpx.get(server.url + "/v1/models").json()
    assert body["object"] == "list" and set(body["data"][0]) == {"id", "object", "created", "owned_by"}
    by_id = {m.id: m for m in listed.data}
    assert by_id["latest"].created == by_id["run/step-2"].created

    for name in ids:  # the SDK percent-encodes the slash; a raw slash works too
        assert client.models.retrieve(name).id == name
        assert httpx.get(f"{server.url}/v1/models/{name}").json()["id"] == name
    assert client.models.retrieve("run/step-1").created == by_id["run/step-1"].created

    for missing in ("nope/step-1", "run/step-9", "run/step-01", "base/extra", "latestx"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(missing)
        error = caught.value.body if "error" not in caught.value.body else caught.value.body["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model" and error["message"]
    with pytest.raises(openai.ConflictError):  # listed by /v1/checkpoints as invalid: the same 409 as completions
        client.models.retrieve("broken/step-1")


def test_listed_models_serve_completions(client):
    for m in client.models.list().data:
        out = client.completions.create(model=m.id, prompt="I watched The", max_tokens=2, temperature=0)
        assert out.model in (m.id, "run/step-2")  # latest answers with the name it resolved to


# -- logprobs -------------------------------------------------------------------------------------------------------

def test_greedy_logprobs_match_in_process(client, tiny):
    model, tokenizer = tiny
    out = client.completions.create(model="base", prompt=PROMPTS, max_tokens=10, temperature=0, logprobs=3)
    assert len(out.choices) == len(PROMPTS)
    for prompt, choice in zip(PROMPTS, sorted(out.choices, key=lambda c: c.index)):
        prompt_ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            full = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                  dtype=torch.long), max_new_tokens=10, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)[0].tolist()
        new = full[len(prompt_ids):]
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(new)
        assert lp.tokens == [tokenizer.decode([t]) for t in new]
        assert "".join(lp.tokens) == choice.text
        assert all(math.isfinite(x) and x <= 0 for x in lp.token_logprobs)
        expected = raw_logprobs(model, prompt_ids + new)[len(prompt_ids) - 1:]  # (len(new), V)
        for step, token in enumerate(new):
            assert lp.token_logprobs[step] == pytest.approx(expected[step, token].item(), abs=TOL)
            top = expected[step].topk(3)
            want = {tokenizer.decode([i]): v for i, v in zip(top.indices.tolist(), top.values.tolist())}
            got = lp.top_logprobs[step]
            assert set(got) == set(want)  # greedy: the chosen token is the most likely, so no extra entry
            assert all(got[k] == pytest.approx(want[k], abs=TOL) for k in want)
            assert max(got.values()) == pytest.approx(lp.token_logprobs[step], abs=TOL)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(new))]
        assert any(x < -1e-3 for x in lp.token_logprobs)  # the model's distribution, not greedy's one-hot


def test_sampled_logprobs_are_the_models_own(client, tiny):
    """Temperature, top-k and penalties pick the tokens; the logprobs stay the raw model's (vLLM's default)."""
    model, tokenizer = tiny
    id_of = {tokenizer.decode([i]): i for i in range(len(tokenizer))}
    out = client.completions.create(model="base", prompt="I watched The", max_tokens=8, temperature=1.7, seed=5,
                                    logprobs=0, presence_penalty=1.0, extra_body={"top_k": 20})
    lp = out.choices[0].logprobs
    ids = [id_of[t] for t in lp.tokens]
    assert "".join(lp.tokens) == out.choices[0].text and len(ids) > 0
    prompt_ids = tokenizer("I watched The")["input_ids"]
    expected = raw_logprobs(model, prompt_ids + ids)[len(prompt_ids) - 1:]
    for step, token in enumerate(ids):
        assert lp.token_logprobs[step] == pytest.approx(expected[step, token].item(), abs=TOL)
        assert lp.top_logprobs[step] == {lp.tokens[step]: pytest.approx(lp.token_logprobs[step])}  # logprobs=0


def test_echo_scores_the_prompt(client, tiny):
    model, tokenizer = tiny
    prompt = "The story follows a young"
    ids = tokenizer(prompt)["input_ids"]
    scored = client.completions.create(model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = scored.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    expected = raw_logprobs(model, ids)
    for i, token in enumerate(ids[1:]):
        assert lp.token_logprobs[i + 1] == pytest.approx(expected[i, token].item(), abs=TOL)
        assert 1 <= len(lp.top_logprobs[i + 1]) <= 2

    both = client.completions.create(model="base", prompt=prompt, max_tokens=5, echo=True, logprobs=2,
                                     temperature=0).choices[0]
    plain = client.completions.create(model="base", prompt=prompt, max_tokens=5, logprobs=2,
                                      temperature=0).choices[0]
    assert both.text == prompt + plain.text
    assert both.logprobs.tokens == lp.tokens + plain.logprobs.tokens
    assert both.logprobs.text_offset[len(ids):] == [len(prompt) + o for o in plain.logprobs.text_offset]
    assert both.logprobs.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=TOL)
    # an empty prompt echoes nothing: its BOS is the server's, not the client's
    empty = client.completions.create(model="base", prompt="", max_tokens=3, echo=True, logprobs=0,
                                      temperature=0).choices[0]
    assert "".join(empty.logprobs.tokens) == empty.text and None not in empty.logprobs.token_logprobs


def test_streamed_logprobs_equal_batched(server, client):
    body = {"model": "base", "prompt": ["I watched The", "This"], "max_tokens": 10, "temperature": 0, "n": 2,
            "logprobs": 2, "echo": True}
    batched = post(server, body).json()
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == batched["usage"]["total_tokens"]
    assert chunks[-1].usage.completion_tokens == batched["usage"]["completion_tokens"]
    merged: dict[int, dict] = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for c in chunk.choices:
            m = merged.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []})
            m["text"] += c.text
            for key in ("tokens", "token_logprobs", "text_offset"):
                m[key] += getattr(c.logprobs, key)
    assert sorted(merged) == [0, 1, 2, 3]
    for choice in batched["choices"]:
        m = merged[choice["index"]]
        assert m["text"] == choice["text"]
        assert m["tokens"] == choice["logprobs"]["tokens"] and m["text_offset"] == choice["logprobs"]["text_offset"]
        assert m["token_logprobs"][0] is None and choice["logprobs"]["token_logprobs"][0] is None
        assert m["token_logprobs"][1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:], abs=TOL)


def test_stream_holds_back_a_stop_string_prefix(server):
    base = {"model": "base", "prompt": "I watched The", "max_tokens": 16, "temperature": 0}
    text = post(server, base).json()["choices"][0]["text"]
    assert len(text) > 8
    stop = text[4:8]  # somewhere in the greedy text: streamed text must never show a part of it
    body = {**base, "stop": [stop], "logprobs": 1}
    batched = post(server, body).json()["choices"][0]
    events = sse(post(server, {**body, "stream": True}))
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == batched["text"] == text[: text.index(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    assert tokens == batched["logprobs"]["tokens"]
    assert "".join(tokens).startswith(batched["text"])  # the tokens behind the text, up to the one the stop cuts


# -- parameters honoured ----------------------------------------------------------------------------------------------

def test_every_openai_parameter_the_client_sends(client):
    out = client.completions.create(
        model="base", prompt=["I watched The"], suffix="", max_tokens=6, temperature=0.8, top_p=0.9, n=2,
        stream=False, logprobs=1, echo=False, stop=["\n\n"], presence_penalty=0.3, frequency_penalty=0.3,
        best_of=2, logit_bias={"5": 1.0}, user="tester", seed=11,
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 1})
    again = client.completions.create(
        model="base", prompt=["I watched The"], suffix="", max_tokens=6, temperature=0.8, top_p=0.9, n=2,
        stream=False, logprobs=1, echo=False, stop=["\n\n"], presence_penalty=0.3, frequency_penalty=0.3,
        best_of=2, logit_bias={"5": 1.0}, user="tester", seed=11,
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 1})
    assert len(out.choices) == 2 and [c.text for c in out.choices] == [c.text for c in again.choices]
    nulls = client.completions.create(model="base", prompt="a", max_tokens=None, temperature=None, top_p=None,
                                      n=None, logprobs=None, stop=None, seed=None, user=None, suffix=None)
    assert nulls.choices[0].finish_reason in ("stop", "length")  # null means the default, as in OpenAI


def test_sampling_parameters_take_effect(server, tiny):
    _, tokenizer = tiny
    prompt = {"model": "base", "prompt": "I watched The", "max_tokens": 8}
    greedy = post(server, {**prompt, "temperature": 0}).json()["choices"][0]["text"]
    for knob in ({"top_k": 1}, {"min_p": 1.0}):  # sampling that keeps one token is greedy decoding
        assert post(server, {**prompt, "temperature": 1.5, "seed": 3, **knob}).json()["choices"][0]["text"] == greedy
    word = 300  # forced by its bias: every new token is it; logprobs still the model's own
    forced = post(server, {**prompt, "temperature": 0, "logit_bias": {str(word): 100}, "logprobs": 0}).json()
    lp = forced["choices"][0]["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([word])] * 8 and any(x < -0.1 for x in lp["token_logprobs"])
    eos = str(tokenizer.eos_token_id)
    ended = post(server, {**prompt, "temperature": 0, "logit_bias": {eos: 100}}).json()
    assert ended["choices"][0]["text"] == "" and ended["choices"][0]["finish_reason"] == "stop"
    held = post(server, {**prompt, "temperature": 0, "logit_bias": {eos: 100}, "min_tokens": 3}).json()
    assert held["usage"]["completion_tokens"] == 3 and held["choices"][0]["finish_reason"] == "stop"
    tokens = post(server, {**prompt, "temperature": 0, "logprobs": 0}).json()["choices"][0]["logprobs"]["tokens"]
    early = {**prompt, "temperature": 0, "max_tokens": 16, "stop": [tokens[1]]}  # a stop string at the 2nd token
    assert post(server, early).json()["usage"]["completion_tokens"] == 1
    late = post(server, {**early, "min_tokens": 8}).json()  # vLLM: no stop string counts before 8 tokens
    assert late["usage"]["completion_tokens"] >= 7
    for knob in ({"repetition_penalty": 3.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = post(server, {**prompt, "temperature": 0, "max_tokens": 24, **knob}).json()["choices"][0]
        plain = post(server, {**prompt, "temperature": 0, "max_tokens": 24}).json()["choices"][0]
        assert penalized["text"] != plain["text"], knob


# -- parameters refused -----------------------------------------------------------------------------------------------

P = {"model": "base", "prompt": "a", "max_tokens": 2}
REFUSED = {  # name the message must contain -> (extra body fields, statuses)
    "top_a": ({"top_a": 0.5}, {400}),
    "use_beam_search": ({"use_beam_search": True}, {400}),
    "ignore_eos": ({"ignore_eos": True}, {400}),
    "stop_token_ids": ({"stop_token_ids": [1]}, {400}),
    "include_stop_str_in_output": ({"include_stop_str_in_output": True}, {400}),
    "skip_special_tokens": ({"skip_special_tokens": False}, {400}),
    "prompt_logprobs": ({"prompt_logprobs": 1}, {400}),
    "typical_p": ({"typical_p": 0.5}, {400}),
    "length_penalty": ({"length_penalty": 2.0}, {400}),
    "guided_json": ({"guided_json": {}}, {400}),
    "response_format": ({"response_format": {"type": "json_object"}}, {400}),
    "null unknown": ({"null unknown": None}, {400}),
    "suffix": ({"suffix": " end."}, {400}),
    "best_of": ({"best_of": 3}, {400}),
    "logprobs": ({"logprobs": 6}, {422}),
    "logprobs ": ({"logprobs": True}, {422}),
    "stream_options": ({"stream_options": {"include_usage": True}}, {400}),
    "continuous_usage_stats": ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, {422}),
    "max_tokens": ({"max_tokens": 0}, {422}),
    "min_tokens": ({"min_tokens": 5}, {422}),
    "logit_bias": ({"logit_bias": {"99999": 1}}, {400}),
    "logit_bias ": ({"logit_bias": {"the": 1}}, {422}),
    "logit_bias  ": ({"logit_bias": {"5": 1000}}, {422}),
    "token-id prompts": ({"prompt": [[1, 2, 3]]}, {422}),
    "repetition_penalty": ({"repetition_penalty": 0}, {422}),
    "presence_penalty": ({"presence_penalty": 3}, {422}),
    "top_k": ({"top_k": -2}, {422}),
    "min_p": ({"min_p": 1.5}, {422}),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_parameters_are_refused_by_name(server, name):
    fields, statuses = REFUSED[name]
    r = post(server, {**P, **fields})
    assert r.status_code in statuses, r.text
    error = r.json()["error"]
    assert name.strip() in error["message"], error
    if r.status_code == 400:
        assert error["param"] == name.strip().split()[0] or name == "null unknown"


def test_openai_client_gets_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="top_a"):
        client.completions.create(model="base", prompt="a", max_tokens=2, extra_body={"top_a": 0.1})
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="base", prompt="a", max_tokens=2, best_of=4)
    with pytest.raises(openai.UnprocessableEntityError, match="logprobs"):
        client.completions.create(model="base", prompt="a", max_tokens=2, logprobs=9)
