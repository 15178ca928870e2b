"""The reward service as a drop-in for other ecosystems' clients, each driven by the real package's own code against
a real uvicorn server on loopback:

* OpenRLHF 0.11.2's remote reward model client (`openrlhf.utils.agent.SingleTurnAgentExecutor`) on /get_reward;
* huggingface_hub's InferenceClient (`text_classification`) on the text-embeddings-inference routes / and /predict;
* /v1/classify's `top_k` shape, checked against transformers' own text-classification pipeline.
"""

from __future__ import annotations

import asyncio
import base64
from types import SimpleNamespace

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from services.reward.app import create_app
from tests.api.test_reward_api import make_settings
from tests.conftest import ServerThread

pytestmark = pytest.mark.slow

KEY = "user-secret"
TEXTS = ["The acting was superb. Highly recommended.", "A waste of two hours. Avoid it.", "I watched The Last River."]
PROMPT = "Review of The Last River:"


@pytest.fixture(scope="module")
def pair_model(tiny_kit, tmp_path_factory):
    """The kit's (prompt, response) text-pair reward model, built here when the kit predates it."""
    path = tiny_kit / "tiny-reward-pair"
    if not (path / "config.json").exists():
        from shared.tiny.reward_models import write_pair

        path = tmp_path_factory.mktemp("tiny-reward-pair")
        write_pair(path, tiny_kit / "tiny-sentiment", seed=1234)
    return path


@pytest.fixture(scope="module")
def server(tiny_kit, pair_model):
    settings = make_settings(tiny_kit, models=[
        {"name": "sentiment", "source": str(tiny_kit / "tiny-sentiment"), "label": "POSITIVE"},
        {"name": "three", "source": str(tiny_kit / "tiny-sentiment-3"), "label": "positive"},
        {"name": "pair", "source": str(pair_model), "input": "pair"},
    ], max_texts_per_request=64)
    s = ServerThread(create_app(settings)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(tiny_kit):
    settings = make_settings(tiny_kit, models=[
        {"name": "sentiment", "source": str(tiny_kit / "tiny-sentiment"), "label": "POSITIVE"}], api_key=KEY)
    s = ServerThread(create_app(settings)).start()
    yield s
    s.stop()


def v1(url: str, path: str, headers=None, **body) -> dict:
    r = httpx.post(url + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def with_credentials(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://")
    return f"{scheme}://{user}:{password}@{rest}"


# -- OpenRLHF ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openrlhf_agent():
    """OpenRLHF's own remote-RM client (installed --no-deps, see the Makefile's venv recipe)."""
    return pytest.importorskip("openrlhf.utils.agent", reason="openrlhf 0.11.2 is installed by `make venv`")


def test_openrlhf_client_gets_the_rewards_of_v1_score(server, openrlhf_agent):
    queries = [PROMPT + " " + t for t in TEXTS]
    executor = openrlhf_agent.SingleTurnAgentExecutor(server.url + "/get_reward")
    results = asyncio.run(executor._fetch_rewards_via_http(queries, [PROMPT] * 3, ["pos", None, 3]))
    assert len(results) == 1  # one server: one request with every query
    expected = v1(server.url, "/v1/score", texts=queries)["scores"]
    assert set(results[0]) == {"rewards", "scores", "extra_logs"}
    assert results[0]["rewards"] == pytest.approx(expected, abs=1e-6)
    assert results[0]["scores"] == results[0]["rewards"]
    assert results[0]["extra_logs"] == {"rm_score": results[0]["rewards"]}

    # Several --remote_rm_url endpoints: OpenRLHF shards the batch across them, each shard scored on its own.
    sharded = openrlhf_agent.SingleTurnAgentExecutor([server.url + "/get_reward"] * 2)
    shards = asyncio.run(sharded._fetch_rewards_via_http(queries, [PROMPT] * 3, [None] * 3))
    assert [len(s["rewards"]) for s in shards] == [2, 1]
    assert [r for s in shards for r in s["rewards"]] == pytest.approx(expected, abs=1e-6)


class Engine:
    """vLLM's place in a rollout: answers every prompt with the same response (token ids and text)."""

    def __init__(self, tokenizer, response: str):
        self.ids, self.text = tokenizer(response, add_special_tokens=False)["input_ids"], response

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        out = SimpleNamespace(token_ids=self.ids, text=self.text, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


@pytest.mark.parametrize("model", ["sentiment", "pair"])
def test_openrlhf_single_turn_rollout_is_rewarded(server, openrlhf_agent, tiny_kit, model):
    """The path a PPO rollout takes: OpenRLHF decodes prompt + response tokens into the query and sends it with its
    prompt; a single-text model scores the query, a pair model (prompt, response)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_kit / "tiny-gpt2")
    executor = openrlhf_agent.SingleTurnAgentExecutor(f"{server.url}/get_reward?model={model}")
    response = " The acting was superb."
    params = SimpleNamespace(max_tokens=16, logprobs=None)
    output = asyncio.run(executor.execute(PROMPT, "a label", params, 64, tokenizer, Engine(tokenizer, response)))
    expected = v1(server.url, "/v1/score", texts=[PROMPT + response], prompts=[PROMPT], model=model)["scores"]
    assert output["reward"] == pytest.approx(expected, abs=1e-6)  # OpenRLHF keeps the list: torch.tensor([reward])
    assert output["scores"] == output["reward"]
    assert output["extra_logs"] == {"rm_score": output["reward"]}


def test_openrlhf_prompts_reach_a_pair_model_as_text_pairs(server, pair_model):
    queries = [PROMPT + " " + t for t in TEXTS]
    got = v1(server.url, "/get_reward?model=pair", query=queries, prompts=[PROMPT] * 3)["rewards"]
    tokenizer = AutoTokenizer.from_pretrained(pair_model)
    model = AutoModelForSequenceClassification.from_pretrained(pair_model).eval()
    with torch.no_grad():
        oracle = [model(**tokenizer(PROMPT, " " + t, return_tensors="pt")).logits[0, 0].item() for t in TEXTS]
    assert got == pytest.approx(oracle, abs=1e-4)
    # A single-text model scores the whole query whatever the prompts, as OpenRLHF's serve_rm does.
    whole = v1(server.url, "/get_reward", query=queries, prompts=["not a prefix"] * 3)["rewards"]
    assert whole == pytest.approx(v1(server.url, "/v1/score", texts=queries)["scores"], abs=1e-6)


def test_openrlhf_with_an_api_key(keyed, openrlhf_agent):
    """OpenRLHF sends no headers of its own; the key goes in the URL and aiohttp sends it as Basic auth."""
    url = with_credentials(keyed.url, "rlhf", KEY) + "/get_reward"
    results = asyncio.run(openrlhf_agent.SingleTurnAgentExecutor(url)._fetch_rewards_via_http(TEXTS, TEXTS, TEXTS))
    expected = v1(keyed.url, "/v1/score", headers={"Authorization": f"Bearer {KEY}"}, texts=TEXTS)["scores"]
    assert results[0]["rewards"] == pytest.approx(expected, abs=1e-6)

    body = {"query": TEXTS}
    assert httpx.post(keyed.url + "/get_reward", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code \
        == 200
    for auth in (None, "Bearer wrong", f"Basic {base64.b64encode(b'rlhf:wrong').decode()}", "Basic !!notbase64",
                 f"Basic {base64.b64encode(KEY.encode()).decode()}"):  # the key as user name, no password
        r = httpx.post(keyed.url + "/get_reward", json=body, headers={"Authorization": auth} if auth else None)
        assert r.status_code == 401, (auth, r.text)
        assert r.json()["error"]["type"] == "unauthorized"


# -- text-embeddings-inference and huggingface_hub.InferenceClient --------------------------------------------------

@pytest.fixture
def hub_online(monkeypatch):
    """huggingface_hub refuses every request, even to a local server, when HF_HUB_OFFLINE=1 (set by conftest): lift
    it for the client; nothing here reaches the Hub."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def oracle(kit, name: str, texts: list[str], **kw) -> list[list[dict]]:
    """transformers' own text-classification pipeline on the same model."""
    return pipeline("text-classification", model=str(kit / name), device="cpu", **kw)(texts)


def assert_ranked(got: list[dict], expected: list[dict]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], abs=1e-5)


def test_inference_client_text_classification(server, tiny_kit, hub_online):
    from huggingface_hub import InferenceClient

    expected = oracle(tiny_kit, "tiny-sentiment", TEXTS, top_k=None)
    for base_url in (server.url, server.url + "/predict"):  # TEI serves / and /predict alike
        client = InferenceClient(base_url=base_url)
        for text, want in zip(TEXTS, expected):
            got = client.text_classification(text)
            assert all(type(e).__name__ == "TextClassificationOutputElement" for e in got)
            assert_ranked([{"label": e.label, "score": e.score} for e in got], want)

    client = InferenceClient(base_url=server.url)
    top = client.text_classification(TEXTS[0], top_k=1)
    assert [e.label for e in top] == ["POSITIVE"]
    logits = client.text_classification(TEXTS[0], function_to_apply="none")
    probs = torch.tensor([e.score for e in logits]).softmax(-1).tolist()
    assert probs == pytest.approx([p["score"] for p in expected[0]], abs=1e-5)
    sigmoid = client.text_classification(TEXTS[0], function_to_apply="sigmoid")
    assert [e.score for e in sigmoid] == pytest.approx(torch.tensor([e.score for e in logits]).sigmoid().tolist())

    three = InferenceClient(base_url=server.url + "/predict?model=three").text_classification(TEXTS[1], top_k=2)
    assert_ranked([{"label": e.label, "score": e.score} for e in three],
                  oracle(tiny_kit, "tiny-sentiment-3", [TEXTS[1]], top_k=2)[0])


def test_async_inference_client(server, hub_online):
    from huggingface_hub import AsyncInferenceClient

    async def main():
        return await AsyncInferenceClient(base_url=server.url).text_classification(TEXTS[0], top_k=2)

    got = asyncio.run(main())
    assert [e.label for e in got] == ["POSITIVE", "NEGATIVE"]


def test_inference_client_errors_and_api_key(keyed, server, hub_online):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    assert [e.label for e in InferenceClient(base_url=keyed.url, api_key=KEY).text_classification(TEXTS[0])] == \
        ["POSITIVE", "NEGATIVE"]
    for client in (InferenceClient(base_url=keyed.url, api_key="wrong"), InferenceClient(base_url=keyed.url)):
        with pytest.raises(HfHubHTTPError) as caught:
            client.text_classification(TEXTS[0])
        assert caught.value.response.status_code == 401
    assert httpx.post(keyed.url + "/predict", json={"inputs": "a"}, auth=("rlhf", KEY)).status_code == 200  # Basic
    with pytest.raises(HfHubHTTPError) as caught:
        InferenceClient(base_url=server.url + "/predict?model=nope").text_classification(TEXTS[0])
    assert caught.value.response.status_code == 404 and "unknown model 'nope'" in str(caught.value)


def test_tei_predict_shapes(server, tiny_kit):
    expected = oracle(tiny_kit, "tiny-sentiment-3", TEXTS, top_k=None)

    def predict(**body):
        return v1(server.url, "/predict?model=three", **body)

    assert_ranked(predict(inputs=TEXTS[0]), expected[0])  # one input: a list
    assert_ranked(predict(inputs=[TEXTS[0]]), expected[0])  # [text] is one input too
    batch = predict(inputs=[[t] for t in TEXTS])  # a batch: a list of lists
    assert len(batch) == 3
    for got, want in zip(batch, expected):
        assert_ranked(got, want)
    assert len(predict(inputs=TEXTS[0], parameters={})) == 1  # the Inference API's answer: a list per input

    raw = predict(inputs=TEXTS[0], raw_scores=True)
    probs = torch.tensor([p["score"] for p in raw]).softmax(-1).tolist()
    assert [p["label"] for p in raw] == [p["label"] for p in expected[0]]
    assert probs == pytest.approx([p["score"] for p in expected[0]], abs=1e-5)


def test_tei_truncation(server):
    long = " ".join(TEXTS * 60)  # far past the 256-token limit
    assert len(v1(server.url, "/predict", inputs=long)) == 2  # the server default: cut
    assert len(v1(server.url, "/predict", inputs=long, truncate=True)) == 2
    r = httpx.post(server.url + "/predict", json={"inputs": [[TEXTS[0]], [long]], "truncate": False})
    assert r.status_code == 422, r.text  # as TEI: a validation error
    assert "inputs[1] has" in r.json()["error"]["message"] and "max_length" in r.json()["error"]["message"]


def test_tei_text_pairs_reach_a_pair_model(server, pair_model):
    tokenizer = AutoTokenizer.from_pretrained(pair_model)
    model = AutoModelForSequenceClassification.from_pretrained(pair_model).eval()
    pairs = [[PROMPT, " " + t] for t in TEXTS]
    with torch.no_grad():
        logits = [model(**tokenizer(a, b, return_tensors="pt")).logits[0, 0].item() for a, b in pairs]
    one = v1(server.url, "/predict?model=pair", inputs=pairs[0], raw_scores=True)
    assert one == [{"label": "LABEL_0", "score": pytest.approx(logits[0], abs=1e-4)}]
    batch = v1(server.url, "/predict?model=pair", inputs=pairs)  # a one-label model: sigmoid, as TEI
    assert [b[0]["score"] for b in batch] == pytest.approx(torch.tensor(logits).sigmoid().tolist(), abs=1e-5)


def test_classify_answers_in_the_pipeline_shape_with_top_k(server, tiny_kit):
    for k in (1, 2, 3, 10):
        got = v1(server.url, "/v1/classify", texts=TEXTS, model="three", top_k=k)
        want = oracle(tiny_kit, "tiny-sentiment-3", TEXTS, top_k=min(k, 3))
        assert len(got) == 3
        for g, w in zip(got, want):
            assert_ranked(g, w)
    plain = v1(server.url, "/v1/classify", texts=TEXTS, model="three")
    assert plain["labels"] == ["positive", "negative", "neutral"]  # without top_k: the answer as before


LONG_BATCH = [["a short review"]] * 65
BAD_REQUESTS = {
    # (path, body, status)
    "reward: empty query": ("/get_reward", {"query": []}, 422),
    "reward: query a string": ("/get_reward", {"query": "a string"}, 422),
    "reward: query not strings": ("/get_reward", {"query": ["fine", 3]}, 422),
    "reward: empty text": ("/get_reward", {"query": ["fine", ""]}, 422),
    "reward: no query": ("/get_reward", {"prompts": ["a"]}, 422),
    "reward: prompts mismatch": ("/get_reward", {"query": ["ab"], "prompts": ["a", "b"]}, 422),
    "reward: labels mismatch": ("/get_reward", {"query": ["ab"], "labels": [1, 2]}, 422),
    "reward: prompts a string": ("/get_reward", {"query": ["ab"], "prompts": "a"}, 422),
    "reward: too many": ("/get_reward", {"query": ["a short review"] * 65}, 413),
    "reward: unknown model": ("/get_reward?model=nope", {"query": ["a"]}, 404),
    "reward: pair model, no prompts": ("/get_reward?model=pair", {"query": ["ab"]}, 422),
    "reward: pair model, not a prefix": ("/get_reward?model=pair", {"query": ["ab"], "prompts": ["x"]}, 422),
    "predict: empty string": ("/predict", {"inputs": ""}, 400),
    "predict: empty in a batch": ("/predict", {"inputs": [["fine"], ["a", ""]]}, 400),
    "predict: empty list": ("/predict", {"inputs": []}, 422),
    "predict: three strings": ("/predict", {"inputs": ["a", "b", "c"]}, 422),
    "predict: a triple in a batch": ("/predict", {"inputs": [["a", "b", "c"]]}, 422),
    "predict: empty item in a batch": ("/predict", {"inputs": [["a"], []]}, 422),
    "predict: mixed": ("/predict", {"inputs": [["a"], "b"]}, 422),
    "predict: a number": ("/predict", {"inputs": 5}, 422),
    "predict: no inputs": ("/predict", {}, 422),
    "predict: unknown field": ("/predict", {"inputs": "a", "top_k": 1}, 422),
    "predict: top_k 0": ("/predict", {"inputs": "a", "parameters": {"top_k": 0}}, 422),
    "predict: unknown function": ("/predict", {"inputs": "a", "parameters": {"function_to_apply": "tanh"}}, 422),
    "predict: raw and softmax": ("/predict", {"inputs": "a", "raw_scores": True,
                                              "parameters": {"function_to_apply": "softmax"}}, 422),
    "predict: left truncation": ("/predict", {"inputs": "a", "truncation_direction": "left"}, 422),
    "predict: too many": ("/predict", {"inputs": LONG_BATCH}, 413),
    "predict: 1 MB text": ("/", {"inputs": "x" * 1_000_000}, 413),
    "predict: unknown model": ("/predict?model=nope", {"inputs": "a"}, 404),
    "predict: pair to a text model": ("/predict", {"inputs": ["a", "b"]}, 422),
    "predict: text to a pair model": ("/predict?model=pair", {"inputs": "a"}, 422),
    "classify: top_k 0": ("/v1/classify", {"texts": ["a"], "top_k": 0}, 422),
    "classify: top_k a string": ("/v1/classify", {"texts": ["a"], "top_k": "all"}, 422),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_envelope_and_the_service_keeps_serving(server, case):
    path, body, status = BAD_REQUESTS[case]
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] and error["message"] and error["request_id"]
    assert httpx.post(server.url + "/get_reward", json={"query": ["still fine"]}).status_code == 200


def test_new_routes_are_in_the_openapi_schema(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/get_reward", "/predict", "/"} <= set(paths)
    assert "top_k" in str(paths["/v1/classify"])
