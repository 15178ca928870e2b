"""Reward-model kinds beyond sentiment classifiers: scalar heads, (prompt, response) pairs, chat templates, causal-LM
sequence classifiers, normalization. Each kind's scores over real HTTP (uvicorn on loopback) equal in-process
`transformers` on the same inputs to 1e-5, alone and in padded batches of different lengths."""

from __future__ import annotations

import httpx
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from services.reward.app import create_app
from services.reward.scorer import PromptsRequiredError, Scorer
from services.reward.settings import RewardSettings
from shared.modeling import ModelLoadError
from shared.schemas import ModelSpec, ScoreRequest
from shared.tiny.build import MAX_LENGTH, build_reward_models
from shared.tiny.corpus import read_jsonl
from tests.conftest import ServerThread

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-secret"}
EXPLICIT_MEAN, EXPLICIT_STD = 1.5, 4.0


@pytest.fixture(scope="module")
def kinds(tiny_kit):
    return build_reward_models(tiny_kit)


@pytest.fixture(scope="module")
def server(tiny_kit, kinds):
    models = [
        {"name": "sentiment", "source": str(tiny_kit / "tiny-sentiment")},
        {"name": "scalar", "source": str(kinds["tiny-reward-scalar"])},
        {"name": "scalar-norm", "source": str(kinds["tiny-reward-scalar"]), "normalize": True},
        {"name": "scalar-norm-explicit", "source": str(kinds["tiny-reward-scalar"]), "normalize": True,
         "reward_mean": EXPLICIT_MEAN, "reward_std": EXPLICIT_STD},
        {"name": "pair", "source": str(kinds["tiny-reward-pair"]), "input": "pair"},
        {"name": "gpt2", "source": str(kinds["tiny-reward-gpt2"])},
        {"name": "chat", "source": str(kinds["tiny-reward-chat"]), "input": "auto"},
    ]
    settings = RewardSettings(models=models, port=0, device="cpu", max_models=8, admin_api_key="admin-secret",
                              model_dirs=[tiny_kit])
    s = ServerThread(create_app(settings)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def samples(tiny_kit) -> tuple[list[str], list[str]]:
    """(prompts, texts): prompts of 0 to 6 words (one is the whole text: an empty response), texts from one word to
    far past the 256-token limit."""
    reviews = [r.text for r in read_jsonl(tiny_kit / "corpus" / "heldout.jsonl")]
    long = " ".join(reviews[:30])
    texts = ["Great film.", "Awful.", reviews[0], reviews[1] + " " + reviews[2], long, reviews[3][:30], long[:900],
             reviews[4]]
    cuts = [0, 1, 2, 3, 4, 6, 5, 2]
    prompts = [text[: len(" ".join(text.split(" ")[:k])) + 1] if k else "" for text, k in zip(texts, cuts)]
    assert all(t.startswith(p) for p, t in zip(prompts, texts))
    return prompts, texts


def post(url: str, path: str = "/v1/score", **body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def service(url: str, model: str, texts: list[str], prompts: list[str] | None = None) -> tuple[list, list]:
    """(scores of the whole list in one request, scores of each text alone)."""
    extra = {} if prompts is None else {"prompts": prompts}
    r = post(url, model=model, texts=texts, **extra)
    assert r.status_code == 200, r.text
    together = r.json()["scores"]
    alone = []
    for i, text in enumerate(texts):
        one = {} if prompts is None else {"prompts": [prompts[i]]}
        r = post(url, model=model, texts=[text], **one)
        assert r.status_code == 200, r.text
        alone.append(r.json()["scores"][0])
    return together, alone


@torch.no_grad()
def transformers_scores(path, texts: list[str], prompts: list[str] | None = None, kind: str = "text",
                        batch: bool = True) -> list[float]:
    """The scalar output as plain `transformers` gives it: the usual recipe (pad = EOS for a tokenizer without a pad
    token, config.pad_token_id in step), right padding, truncation at the kit's 256 tokens."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    cut = {"truncation": True, "max_length": MAX_LENGTH}

    def encode(idx: list[int]):
        if kind == "text":
            return tok([texts[i] for i in idx], padding=True, return_tensors="pt", **cut)
        responses = [texts[i][len(prompts[i]):] for i in idx]
        if kind == "pair":
            return tok([prompts[i] for i in idx], responses, padding=True, return_tensors="pt", **cut)
        chats = [[{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": r}]
                 for i, r in zip(idx, responses)]
        return tok.apply_chat_template(chats, tokenize=True, padding=True, return_tensors="pt", return_dict=True,
                                       **cut)

    groups = [list(range(len(texts)))] if batch else [[i] for i in range(len(texts))]
    out: list[float] = []
    for idx in groups:
        enc = encode(idx)
        if len(idx) > 1:
            assert (enc["attention_mask"] == 0).any()  # the batch really is padded
        out += model(**enc).logits[:, 0].tolist()
    return out


def assert_close(got: list[float], want: list[float], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    assert max(abs(g - w) for g, w in zip(got, want)) <= tol, (got, want)


def assert_matches_transformers(url, model, path, texts, prompts=None, kind="text") -> list[float]:
    together, alone = service(url, model, texts, prompts)
    reference = transformers_scores(path, texts, prompts, kind)
    assert_close(together, reference)
    assert_close(alone, transformers_scores(path, texts, prompts, kind, batch=False))
    assert_close(alone, together)
    assert len(set(round(s, 4) for s in together)) > len(texts) // 2  # the inputs really move the score
    return together


# -- scalar heads and normalization -----------------------------------------------------------------------------------

def test_scalar_head_returns_the_raw_value_as_transformers_does(server, kinds, samples):
    _, texts = samples
    scores = assert_matches_transformers(server.url, "scalar", kinds["tiny-reward-scalar"], texts)
    r = post(server.url, model="scalar", texts=["The acting was superb. Highly recommended.", "A waste of time."])
    body = r.json()
    assert body["score_kind"] == "logit" and body["label"] == "LABEL_0"
    assert body["scores"][0] > 1 > -1 > body["scores"][1]  # a raw reward, not a softmax over one logit (1.0)
    assert any(s < 0 for s in scores) and any(s > 1 for s in scores)
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models["scalar"]["score_kind"] == "logit" and models["scalar"]["labels"] == {"0": "LABEL_0"}
    assert models["scalar"]["input"] == "text" and models["scalar"]["reward_mean"] is None
    # The single label may be named; /v1/classify gives a sigmoid, as transformers' pipeline does for one logit.
    assert post(server.url, model="scalar", texts=["Fine."], label="label_0").status_code == 200
    assert post(server.url, model="scalar", texts=["Fine."], label="POSITIVE").status_code == 422
    probs = post(server.url, "/v1/classify", model="scalar", texts=texts[:2]).json()["probabilities"]
    assert [p["LABEL_0"] for p in probs] == pytest.approx(torch.tensor(scores[:2]).sigmoid().tolist(), abs=1e-6)


def test_scalar_head_refuses_score_prob_with_the_reason(server, kinds):
    source = str(kinds["tiny-reward-scalar"])
    with pytest.raises(ModelLoadError, match=r"scalar-head reward model \(num_labels 1\).*1\.0 for every text"):
        Scorer(ModelSpec(source=source, score="prob"))
    with pytest.raises(ModelLoadError, match="label 'POSITIVE' has no meaning for a scalar-head"):
        Scorer(ModelSpec(source=source, label="POSITIVE"))
    r = httpx.put(server.url + "/v1/models/extra", json={"source": source, "score": "prob"}, headers=ADMIN,
                  timeout=60)
    assert r.status_code == 422 and r.json()["error"]["type"] == "model_load_failed"
    assert "score: logit" in r.json()["error"]["message"]
    assert post(server.url, model="extra", texts=["Fine."]).status_code == 404  # nothing was loaded


def test_normalization_from_config_json_or_explicit_values(server, kinds, samples):
    _, texts = samples
    config = AutoModelForSequenceClassification.from_pretrained(kinds["tiny-reward-scalar"]).config
    raw = post(server.url, model="scalar", texts=texts).json()["scores"]
    from_config = post(server.url, model="scalar-norm", texts=texts).json()
    assert from_config["score_kind"] == "logit"
    assert_close(from_config["scores"], [(x - config.mean) / config.std for x in raw])
    explicit = post(server.url, model="scalar-norm-explicit", texts=texts).json()["scores"]
    assert_close(explicit, [(x - EXPLICIT_MEAN) / EXPLICIT_STD for x in raw])
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert (models["scalar-norm"]["reward_mean"], models["scalar-norm"]["reward_std"]) == (config.mean, config.std)
    assert models["scalar-norm-explicit"]["reward_std"] == EXPLICIT_STD


def test_normalization_settings_are_checked(tiny_kit):
    with pytest.raises(ValidationError, match="only with normalize: true"):
        ModelSpec(source="x", reward_mean=1.0)
    with pytest.raises(ValidationError, match="normalize applies to raw scores"):
        ModelSpec(source="x", normalize=True, score="prob")
    for bad in ({"reward_std": 0.0}, {"reward_std": 1e-300}, {"reward_mean": float("inf")}, {"reward_mean": 1e300}):
        with pytest.raises(ValidationError):  # (score - mean) / std must stay finite
            ModelSpec(source="x", normalize=True, **bad)
    with pytest.raises(ModelLoadError, match="normalize needs a mean and a std"):
        Scorer(ModelSpec(source=str(tiny_kit / "tiny-sentiment"), normalize=True))
    # A classifier with normalize and no explicit score kind: normalized logits.
    scorer = Scorer(ModelSpec(source=str(tiny_kit / "tiny-sentiment"), normalize=True, reward_mean=0, reward_std=2))
    assert scorer.spec.score == "logit"
    logits = scorer.forward(scorer.tokenize(["A delightful film."], True))
    assert scorer.scores(logits) == pytest.approx([logits[0][1] / 2], abs=1e-6)


# -- prompt-and-response models ---------------------------------------------------------------------------------------

def test_pair_model_scores_prompt_and_response_as_a_text_pair(server, kinds, samples):
    prompts, texts = samples
    path = kinds["tiny-reward-pair"]
    scores = assert_matches_transformers(server.url, "pair", path, texts, prompts, kind="pair")
    # The response's token type ids (1) reach the model: scoring the same ids without them gives other values.
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    enc = tok(prompts[:3], [t[len(p):] for p, t in zip(prompts[:3], texts[:3])], padding=True, return_tensors="pt")
    with torch.no_grad():
        untyped = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(untyped, scores[:3])) > 1e-3
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models["pair"]["input"] == "pair"


def test_chat_model_scores_through_its_chat_template(server, kinds, samples):
    prompts, texts = samples
    path = kinds["tiny-reward-chat"]
    assert_matches_transformers(server.url, "chat", path, texts, prompts, kind="chat")
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models["chat"]["input"] == "chat" and models["chat"]["reward_label"] == "reward"  # auto -> chat
    # The template writes BOS itself: exactly one, as apply_chat_template(tokenize=True) gives.
    scorer = Scorer(ModelSpec(source=str(path), input="chat"))
    ids = scorer.tokenize([texts[0]], True, prompts=[prompts[0]])[0]
    chat = [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": texts[0][len(prompts[0]):]}]
    assert ids == scorer.tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert ids.count(scorer.tokenizer.bos_token_id) == 1 and ids[-1] == scorer.tokenizer.eos_token_id


def test_input_kinds_resolve_and_refuse_clearly(tiny_kit, kinds):
    assert Scorer(ModelSpec(source=str(kinds["tiny-reward-gpt2"]), input="auto")).input_kind == "text"
    with pytest.raises(ModelLoadError, match="input: chat needs a tokenizer with a chat template"):
        Scorer(ModelSpec(source=str(kinds["tiny-reward-pair"]), input="chat"))
    pair = Scorer(ModelSpec(source=str(kinds["tiny-reward-pair"]), input="pair"))
    with pytest.raises(PromptsRequiredError, match="send `prompts`"):
        pair.tokenize(["no prompt here"], True)
    # A long response is cut to max_length (longest first), or refused without truncation.
    ids = pair.tokenize(["Q? " + "word " * 400], True, prompts=["Q? "])
    assert len(ids[0]) == pair.max_length
    with pytest.raises(ValueError, match="max_length"):
        pair.tokenize(["Q? " + "word " * 400], False, prompts=["Q? "])
    with pytest.raises(ModelLoadError, match="leaves no room for a text pair"):  # [CLS] a [SEP] b [SEP]
        Scorer(ModelSpec(source=str(kinds["tiny-reward-pair"]), input="pair", max_length=3))


def test_prompts_must_match_the_texts(server):
    cases = [
        ({"texts": ["Hello there. Fine film."], "prompts": ["Goodbye."]}, "prompts[0] is not a prefix of texts[0]"),
        ({"texts": ["a b", "c d"], "prompts": ["a"]}, "prompts has 1 entries but texts has 2"),
        ({"texts": ["a b", "c d", "e f"], "prompts": ["a", "x", "y"]}, "prompts[1] is not a prefix of texts[1]"),
        ({"texts": ["a b"], "prompts": [3]}, "prompts"),
    ]
    for body, message in cases:
        for model in ("pair", "sentiment"):
            r = post(server.url, model=model, **body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["type"] == "invalid_request" and message in r.json()["error"]["message"]
    r = post(server.url, model="chat", texts=["How was it? Great."])  # a prompt-and-response model, no prompts
    assert r.status_code == 422 and "send `prompts`" in r.json()["error"]["message"]
    assert post(server.url, "/v1/classify", model="pair", texts=["How was it? Great."]).status_code == 422
    with pytest.raises(ValidationError, match="not a prefix"):
        ScoreRequest(texts=["abc"], prompts=["abd"])
    assert ScoreRequest(texts=["abc"], prompts=["abc"]).prompts == ["abc"]  # an empty response is allowed


def test_single_text_models_ignore_prompts(server, samples):
    prompts, texts = samples
    for model in ("sentiment", "scalar", "gpt2"):
        plain = post(server.url, model=model, texts=texts).json()["scores"]
        with_prompts = post(server.url, model=model, texts=texts, prompts=prompts).json()["scores"]
        assert with_prompts == pytest.approx(plain, abs=1e-6)


# -- causal-LM sequence classifiers -----------------------------------------------------------------------------------

def test_gpt2_classifier_without_a_pad_token_pads_with_eos_and_reads_the_last_real_token(server, kinds, samples):
    _, texts = samples
    path = kinds["tiny-reward-gpt2"]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token is None
    assert AutoModelForSequenceClassification.from_pretrained(path).config.pad_token_id is None
    # One text ends with the EOS token, which is also the pad token: transformers reads the token before it (the
    # rightmost token that is not padding), and so must the service, alone and in a padded batch.
    texts = [*texts, texts[0] + tok.eos_token]
    assert_matches_transformers(server.url, "gpt2", path, texts)
    scorer = Scorer(ModelSpec(source=str(path)))
    assert scorer.pad_id == tok.eos_token_id == scorer.model.config.pad_token_id
    assert scorer.tokenizer.pad_token_id == tok.eos_token_id


def test_a_checkpoint_without_a_classification_head_is_refused(tiny_kit):
    """A causal LM (or a reward model whose head has another name, e.g. OpenRLHF's value_head) would load with a
    newly initialized head and score at random."""
    with pytest.raises(ModelLoadError, match=r"no weights for score\.weight.*score at random"):
        Scorer(ModelSpec(source=str(tiny_kit / "tiny-gpt2")))
