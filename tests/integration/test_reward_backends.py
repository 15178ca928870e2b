"""Reward backends: torch bfloat16, ONNX float32 and int8 against float32 torch on the tiny corpus's held-out texts,
each loaded through the Scorer (the service's loading path), within the tolerances of backends.TOLERANCES; the ONNX
cache (reused, rebuilt when damaged); `auto`; and refused backend/dtype combinations over the admin API."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import ValidationError

from services.reward import onnx_cache
from services.reward.app import create_app
from services.reward.backends import TOLERANCES
from services.reward.calibration import agreement
from services.reward.scorer import Scorer
from shared.modeling import ModelLoadError
from shared.schemas import ModelSpec
from shared.tiny.build import build_reward_models
from shared.tiny.corpus import read_jsonl
from tests.api.test_reward_api import make_settings

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-secret"}
NO_CACHE = shutil.ignore_patterns(".onnx-cache")  # a copy starts without the kit's exports (another run may have some)


@pytest.fixture(scope="module")
def sentiment(tiny_kit, tmp_path_factory) -> Path:
    """A copy of tiny-sentiment, so that its ONNX cache is this module's own."""
    return Path(shutil.copytree(tiny_kit / "tiny-sentiment", tmp_path_factory.mktemp("models") / "tiny-sentiment",
                                ignore=NO_CACHE))


@pytest.fixture(scope="module")
def heldout(tiny_kit) -> list[str]:
    return [r.text for r in read_jsonl(tiny_kit / "corpus" / "heldout.jsonl")]


def probabilities(scorer: Scorer, texts: list[str], batch: int = 32) -> torch.Tensor:
    """(N, labels) through the service's path: tokenize, pad into batches, the backend, softmax."""
    ids = scorer.tokenize(texts, True, None if scorer.input_kind == "text" else [""] * len(texts))
    return scorer.probabilities([row for i in range(0, len(ids), batch) for row in scorer.forward(ids[i : i + batch])])


@pytest.fixture(scope="module")
def reference(sentiment, heldout) -> torch.Tensor:
    return probabilities(Scorer(ModelSpec(source=str(sentiment))), heldout)


@pytest.mark.parametrize("backend,dtype", [("torch", "bfloat16"), ("onnx", "float32"), ("onnx", "int8")])
def test_each_backend_is_within_its_tolerance_of_float32_torch(sentiment, heldout, reference, backend, dtype):
    scorer = Scorer(ModelSpec(source=str(sentiment), backend=backend, dtype=dtype))
    assert (scorer.backend.kind, scorer.backend.dtype) == (backend, dtype)
    assert (scorer.spec.backend, scorer.spec.dtype) == (backend, dtype)
    got = agreement(reference, probabilities(scorer, heldout), scorer.label_index)
    tolerance = TOLERANCES[backend, dtype]
    print(f"{backend} {dtype}: max |dp| {got.max_abs_prob:.2e}, rank agreement {got.rank_agreement:.4f}")
    assert got.max_abs_prob <= tolerance.max_abs_prob
    if tolerance.min_rank_agreement is not None:
        assert got.rank_agreement >= tolerance.min_rank_agreement
    if backend == "onnx":
        assert scorer.model is None  # the graph holds the weights; the torch copy is freed


def test_onnx_graph_is_cached_reused_and_rebuilt_when_damaged(tiny_kit, tmp_path, heldout, monkeypatch):
    model = Path(shutil.copytree(tiny_kit / "tiny-sentiment", tmp_path / "m", ignore=NO_CACHE))
    exports = []
    real_export = onnx_cache.export
    monkeypatch.setattr(onnx_cache, "export", lambda *a, **kw: (exports.append(1), real_export(*a, **kw))[1])
    spec = ModelSpec(source=str(model), backend="onnx")
    first = probabilities(Scorer(spec), heldout[:64])
    assert len(exports) == 1
    [entry] = (model / ".onnx-cache").glob("float32-*")
    assert (entry / "model.onnx").is_file()

    second = probabilities(Scorer(spec), heldout[:64])
    assert len(exports) == 1  # the cached graph, no second export
    assert torch.equal(first, second)

    int8 = Scorer(ModelSpec(source=str(model), backend="onnx", dtype="int8"))
    assert len(exports) == 1  # quantized from the cached float32 graph
    assert (int8.backend.kind, int8.backend.dtype) == ("onnx", "int8")

    for graph in entry.glob("*.onnx"):  # a damaged entry (a half-copied cache, a full disk) ...
        graph.write_bytes(b"not an onnx graph")
    third = probabilities(Scorer(spec), heldout[:64])
    assert len(exports) == 2  # ... is exported again, not fatal
    assert torch.allclose(third, first, atol=1e-6)
    assert not [p for p in (model / ".onnx-cache").iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_cache_goes_to_the_user_cache_when_the_model_is_not_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    assert onnx_cache.cache_roots("some-org/some-model") == [tmp_path / "cache" / "onnx"]
    assert onnx_cache.cache_roots(str(tmp_path))[0] == tmp_path / ".onnx-cache"


def test_a_cache_entry_finished_first_by_another_process_is_kept(tmp_path):
    def build(scratch: Path) -> None:  # while this process builds, another renames its finished copy into place
        (scratch / onnx_cache.MODEL_FILE).write_bytes(b"ours")
        (tmp_path / "entry").mkdir()
        (tmp_path / "entry" / onnx_cache.MODEL_FILE).write_bytes(b"theirs")

    entry = onnx_cache._build_entry([tmp_path], "entry", build)
    assert (entry / onnx_cache.MODEL_FILE).read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # our scratch copy is gone
    assert onnx_cache._build_entry([tmp_path], "entry", lambda _: pytest.fail("rebuilt")) == entry


def test_auto_picks_a_backend_within_tolerance_and_reports_it(sentiment, heldout, reference, caplog):
    with caplog.at_level(logging.INFO, logger="services.reward.calibration"):
        scorer = Scorer(ModelSpec(source=str(sentiment), backend="auto"))
    chosen = (scorer.backend.kind, scorer.backend.dtype)
    assert chosen in TOLERANCES and scorer.backend_requested == "auto"
    assert (scorer.spec.backend, scorer.spec.dtype) == chosen
    assert f"chosen: {chosen[0]} {chosen[1]}" in caplog.text and "texts/s" in caplog.text
    got = agreement(reference, probabilities(scorer, heldout), scorer.label_index)
    assert got.max_abs_prob <= TOLERANCES[chosen].max_abs_prob


@pytest.mark.parametrize("kind,extra", [("tiny-reward-gpt2", {}), ("tiny-reward-pair", {"input": "pair"})])
def test_onnx_keeps_causal_lm_padding_and_token_type_ids(tiny_kit, tmp_path, heldout, kind, extra):
    """A GPT-2 classifier reads the last token before its pad id; a pair model takes token type ids."""
    model = shutil.copytree(build_reward_models(tiny_kit)[kind], tmp_path / kind, ignore=NO_CACHE)
    texts = heldout[:40] + ["Fine.", "No."]  # very different lengths in one batch: lots of padding
    prompts = [t[: len(t) // 3] for t in texts]
    out = {}
    for backend in ("torch", "onnx"):
        scorer = Scorer(ModelSpec(source=str(model), backend=backend, **extra))
        ids = scorer.tokenize(texts, True, prompts)
        out[backend] = scorer.probabilities(scorer.forward(ids))
    assert (out["onnx"] - out["torch"]).abs().max().item() <= TOLERANCES["onnx", "float32"].max_abs_prob


@pytest.mark.parametrize("backend,dtype", [("onnx", "bfloat16"), ("onnx", "float16"), ("torch", "int8"),
                                           ("auto", "int8"), ("auto", "bfloat16")])
def test_spec_refuses_a_dtype_its_backend_does_not_take(backend, dtype):
    with pytest.raises(ValidationError, match=f"backend {backend} does not take dtype {dtype}"):
        ModelSpec(source="x", backend=backend, dtype=dtype)


def test_service_shorthand_takes_backend_and_dtype():
    from services.reward.settings import RewardSettings

    settings = RewardSettings(model="some/model", backend="onnx", dtype="int8")
    assert (settings.models[0].backend, settings.models[0].dtype) == ("onnx", "int8")
    with pytest.raises(ValidationError, match="does not take dtype int8"):
        RewardSettings(model="some/model", backend="torch", dtype="int8")
    with pytest.raises(ValidationError, match="apply to `model`"):
        RewardSettings(models=[{"name": "a", "source": "x"}], backend="onnx")


def test_float16_on_a_cpu_is_refused_at_load(sentiment):
    with pytest.raises(ModelLoadError, match="float16 needs a GPU"):
        Scorer(ModelSpec(source=str(sentiment), dtype="float16"), device="cpu")


def test_admin_api_refuses_bad_combinations_and_lists_the_backend(sentiment, serve):
    settings = make_settings(sentiment.parent, admin_api_key="admin-secret", model_dirs=[sentiment.parent],
                             models=[{"name": "sentiment", "source": str(sentiment)}])
    s = serve(create_app(settings))
    for spec, status, kind, says in [
        ({"backend": "onnx", "dtype": "bfloat16"}, 422, "invalid_request", "does not take dtype bfloat16"),
        ({"backend": "torch", "dtype": "int8"}, 422, "invalid_request", "does not take dtype int8"),
        ({"backend": "tensorrt"}, 422, "invalid_request", "backend"),
        ({"dtype": "float16"}, 422, "model_load_failed", "float16 needs a GPU"),
    ]:
        r = httpx.put(f"{s.url}/v1/models/x", json={"source": str(sentiment), **spec}, headers=ADMIN, timeout=60)
        assert r.status_code == status, r.text
        assert r.json()["error"]["type"] == kind and says in r.json()["error"]["message"], r.text

    r = httpx.put(f"{s.url}/v1/models/q", json={"source": str(sentiment), "backend": "onnx", "dtype": "int8"},
                  headers=ADMIN, timeout=120)
    assert r.status_code == 201, r.text
    assert (r.json()["backend"], r.json()["dtype"], r.json()["backend_requested"]) == ("onnx", "int8", "onnx")
    listed = {m["name"]: m for m in httpx.get(f"{s.url}/v1/models").json()["models"]}
    assert (listed["sentiment"]["backend"], listed["sentiment"]["dtype"]) == ("torch", "float32")
    scored = httpx.post(f"{s.url}/v1/score", json={"texts": ["Superb.", "Awful."], "model": "q"}).json()["scores"]
    assert scored[0] > scored[1]


def test_int8_scores_a_text_the_same_whatever_its_batch(sentiment, heldout):
    """Dynamic int8 scales activations by the batch's largest value; each text runs alone, so its neighbours (and
    their padding) cannot move its score."""
    scorer = Scorer(ModelSpec(source=str(sentiment), backend="onnx", dtype="int8"))
    texts = heldout[:40]
    alone = torch.cat([probabilities(scorer, [t], batch=1) for t in texts])
    together = probabilities(scorer, texts, batch=40)
    shuffled = probabilities(scorer, texts[::-1] + ["An outlier " * 60], batch=41)[:40].flip(0)
    assert torch.equal(alone, together) and torch.equal(alone, shuffled)
