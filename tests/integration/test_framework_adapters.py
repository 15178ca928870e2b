"""shared/frameworks/ against a real reward service: TRL's reward-function contract and veRL's custom reward function.

The TRL contract is exercised here the way TRL 1.16 calls reward functions (TRL itself runs in tests/e2e/
test_trl_grpo.py); veRL 0.9.1's own reward managers drive the veRL module in the framework environment
(`make trl-env`), since veRL cannot live in this project's .venv.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import json
import os
import pickle
import subprocess
import threading

import pytest

from services.reward.app import create_app
from shared.clients import RetryPolicy, RewardClient, ServiceError
from shared.frameworks import verl as verl_adapter
from shared.frameworks.trl import AsyncRemoteReward, RemoteReward, sample_text
from tests.api.test_reward_api import make_settings
from tests.conftest import ROOT, ServerThread, framework_python, free_port

pytestmark = pytest.mark.slow

PROMPTS = ["I watched The Lonely Harbor.", "The film"]
COMPLETIONS = [" It is one of the best films I have seen this year.", " was a waste of two hours. Avoid it."]
FAST_FAIL = RetryPolicy(max_retries=0, deadline_s=5)


@pytest.fixture(scope="module")
def service(tiny_kit):
    s = ServerThread(create_app(make_settings(tiny_kit))).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def truth(service):
    """The service's own scores, through the project's client: what every adapter must reproduce."""
    with RewardClient(service.url, label="POSITIVE") as client:
        yield client.score


def trl_kwargs(n: int) -> dict:
    """What TRL 1.16's GRPOTrainer passes besides prompts and completions (`_calculate_rewards`)."""
    return {"completion_ids": [[1, 2, 3]] * n, "trainer_state": object(), "log_extra": lambda *a, **k: None,
            "log_metric": lambda *a, **k: None, "difficulty": ["easy"] * n}


# TRL 1.16's own helpers (trl/trainer/utils.py), which decide how a reward function is named and awaited.
def trl_callable_name(func) -> str:
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def trl_is_async_callable(func) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(func.__call__)


# -- TRL ------------------------------------------------------------------------------------------------------------

def test_remote_reward_scores_prompt_plus_completion_as_trl_calls_it(service, truth):
    reward = RemoteReward(service.url, label="POSITIVE")
    got = reward(prompts=PROMPTS, completions=COMPLETIONS, **trl_kwargs(2))
    assert got == pytest.approx(truth([p + c for p, c in zip(PROMPTS, COMPLETIONS)]), abs=1e-5)
    assert got[0] > 0.9 and got[1] < 0.1 and all(type(x) is float for x in got)
    alone = RemoteReward(service.url, label="POSITIVE", include_prompt=False)(prompts=PROMPTS, completions=COMPLETIONS)
    assert alone == pytest.approx(truth(COMPLETIONS), abs=1e-5)
    negative = RemoteReward(service.url, label="NEGATIVE")(prompts=PROMPTS, completions=COMPLETIONS)
    assert negative == pytest.approx([1 - x for x in got], abs=1e-4)


def test_remote_reward_scores_conversations_by_their_last_user_and_assistant_text(service, truth):
    prompts = [[{"role": "system", "content": "You review films."}, {"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c.strip()}] for c in COMPLETIONS]
    expected = truth([f"{p}\n{c.strip()}" for p, c in zip(PROMPTS, COMPLETIONS)])
    reward = RemoteReward(service.url, label="POSITIVE")
    assert reward(prompts=prompts, completions=completions, **trl_kwargs(2)) == pytest.approx(expected, abs=1e-5)
    # A tool-calling turn: the final assistant text is the answer; content parts contribute their text.
    tool_turn = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "search"}}]},
                 {"role": "tool", "name": "search", "content": "terrible reviews everywhere"},
                 {"role": "assistant", "content": [{"type": "text", "text": COMPLETIONS[0].strip()}]}]
    no_answer = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "search"}}]}]
    got = reward(prompts=[prompts[0], prompts[1]], completions=[tool_turn, no_answer])
    assert got[0] == pytest.approx(expected[0], abs=1e-5)
    assert got[1] is None  # nothing to score: TRL allows None and leaves this function out for that sample
    assert sample_text(prompts[0], completions[0], include_prompt=False) == COMPLETIONS[0].strip()


def test_remote_reward_returns_none_only_for_what_it_cannot_score(service, truth):
    reward = RemoteReward(service.url, label="POSITIVE", include_prompt=False)
    got = reward(prompts=["a", "b", "c"], completions=[COMPLETIONS[0], "", COMPLETIONS[1]])
    assert got[1] is None and got[0] == pytest.approx(truth([COMPLETIONS[0]])[0], abs=1e-5)
    assert reward(prompts=["a"], completions=[""]) == [None]  # nothing sent at all
    custom = RemoteReward(service.url, label="POSITIVE", to_text=lambda p, c: c.upper() if c else "")
    assert custom(prompts=["x", "y"], completions=["great", ""]) == pytest.approx([truth(["GREAT"])[0], None])


def test_names_and_async_detection_follow_trl(service):
    sync, other = RemoteReward(service.url, label="POSITIVE"), RemoteReward(service.url, model="three", name="three")
    assert trl_callable_name(sync) == "reward_service_POSITIVE" and trl_callable_name(other) == "three"
    assert trl_callable_name(RemoteReward(service.url)) == "reward_service"
    assert not trl_is_async_callable(sync)
    assert trl_is_async_callable(AsyncRemoteReward(service.url, label="POSITIVE"))
    assert trl_is_async_callable(functools.partial(AsyncRemoteReward(service.url)))


def test_async_remote_reward_on_trls_daemon_event_loop(service, truth):
    """GRPO/RLOO await async reward functions on one event loop in a daemon thread, concurrently with each other."""
    reward = AsyncRemoteReward(service.url, label="POSITIVE")
    negative = AsyncRemoteReward(service.url, label="NEGATIVE")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        async def both():
            return await asyncio.gather(reward(prompts=PROMPTS, completions=COMPLETIONS, **trl_kwargs(2)),
                                        negative(prompts=PROMPTS, completions=COMPLETIONS))

        for _ in range(2):  # the client of this loop is reused
            pos, neg = asyncio.run_coroutine_threadsafe(both(), loop).result(timeout=60)
            assert pos == pytest.approx(truth([p + c for p, c in zip(PROMPTS, COMPLETIONS)]), abs=1e-5)
            assert neg == pytest.approx([1 - x for x in pos], abs=1e-4)
        asyncio.run_coroutine_threadsafe(reward.aclose(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    # Another loop gets its own client.
    assert asyncio.run(reward(prompts=PROMPTS[:1], completions=COMPLETIONS[:1])) == pytest.approx(pos[:1], abs=1e-5)


def test_remote_reward_pickles_without_its_connections(service, truth):
    for reward in (RemoteReward(service.url, label="POSITIVE", name="r"),
                   AsyncRemoteReward(service.url, label="POSITIVE")):
        if isinstance(reward, RemoteReward):
            reward(prompts=PROMPTS, completions=COMPLETIONS)  # opens the pool first
        copy = pickle.loads(pickle.dumps(reward))
        got = copy(prompts=PROMPTS, completions=COMPLETIONS)
        got = asyncio.run(got) if inspect.isawaitable(got) else got
        assert got == pytest.approx(truth([p + c for p, c in zip(PROMPTS, COMPLETIONS)]), abs=1e-5)
        assert trl_callable_name(copy) == trl_callable_name(reward)


def test_remote_reward_errors_raise_or_become_none(service):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError):
        RemoteReward(dead, retry=FAST_FAIL)(prompts=PROMPTS, completions=COMPLETIONS)
    assert RemoteReward(dead, retry=FAST_FAIL, on_error="none")(prompts=PROMPTS, completions=COMPLETIONS) == [None] * 2
    assert asyncio.run(AsyncRemoteReward(dead, retry=FAST_FAIL, on_error="none")(
        prompts=PROMPTS, completions=COMPLETIONS)) == [None] * 2
    with pytest.raises(ServiceError, match="missing"):  # a 4xx is the caller's mistake: never None, never retried
        RemoteReward(service.url, model="missing")(prompts=PROMPTS, completions=COMPLETIONS)
    with pytest.raises(ValueError):
        RemoteReward(service.url, on_error="zero")
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        RemoteReward(service.url)(prompts=PROMPTS, completions=COMPLETIONS[:1])


def test_settings_come_from_the_environment(service, truth, monkeypatch, tiny_kit):
    monkeypatch.setenv("RLHF_REWARD_URL", service.url)
    monkeypatch.setenv("RLHF_REWARD_LABEL", "POSITIVE")
    reward = RemoteReward()
    assert reward.url == service.url and reward.__name__ == "reward_service_POSITIVE"
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == pytest.approx(
        truth([p + c for p, c in zip(PROMPTS, COMPLETIONS)]), abs=1e-5)
    assert verl_adapter.compute_score("tiny", COMPLETIONS[0], None) == pytest.approx(truth(COMPLETIONS[:1])[0],
                                                                                      abs=1e-5)
    # The scoring key, from REWARD_API_KEY
    keyed = ServerThread(create_app(make_settings(tiny_kit, api_key="sekret"))).start()
    try:
        monkeypatch.setenv("RLHF_REWARD_URL", keyed.url)
        with pytest.raises(ServiceError, match="401"):
            RemoteReward()(prompts=PROMPTS, completions=COMPLETIONS)
        monkeypatch.setenv("REWARD_API_KEY", "sekret")
        assert RemoteReward()(prompts=PROMPTS, completions=COMPLETIONS)[0] > 0.9
        assert verl_adapter.compute_score("tiny", COMPLETIONS[0], None) > 0.9
    finally:
        keyed.stop()


# -- veRL -----------------------------------------------------------------------------------------------------------

def test_verl_compute_score_shapes(service, truth):
    kw = {"url": service.url, "label": "POSITIVE"}
    expected = truth(COMPLETIONS)
    one = [verl_adapter.compute_score("tiny", c, None, {"index": i}, **kw) for i, c in enumerate(COMPLETIONS)]
    assert one == pytest.approx(expected, abs=1e-5) and all(type(x) is float for x in one)
    assert asyncio.run(verl_adapter.compute_score_async(data_source="tiny", solution_str=COMPLETIONS[0],
                                                        ground_truth=None, extra_info={}, **kw)) == \
        pytest.approx(expected[0], abs=1e-5)
    batch = verl_adapter.compute_score_batch(data_sources=["tiny"] * 3, solution_strs=[*COMPLETIONS, ""],
                                             ground_truths=[None] * 3, extra_infos=[{}, {}, {}], **kw)
    assert batch == pytest.approx([*expected, 0.0], abs=1e-5)
    # prompt_key: the question a dataset keeps in extra_info is scored with the response; empty_score; ignored kwargs
    info = {"question": PROMPTS[0]}
    assert verl_adapter.compute_score("tiny", COMPLETIONS[0], None, info, prompt_key="question",
                                      reward_router_address=None, **kw) == \
        pytest.approx(truth([PROMPTS[0] + COMPLETIONS[0]])[0], abs=1e-5)
    assert verl_adapter.compute_score("tiny", "", None, None, empty_score=-1.0, **kw) == -1.0
    with pytest.raises(ServiceError):
        verl_adapter.compute_score("tiny", "x", None, None, url=service.url, model="missing")


def test_verl_module_loads_by_file_path_like_verl(service, truth):
    """veRL's load_module: spec_from_file_location under a made-up name (no package), then getattr(name)."""
    path = ROOT / "shared" / "frameworks" / "verl.py"
    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(str(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = functools.partial(module.compute_score, url=service.url, label="POSITIVE")
    assert fn(data_source="tiny", solution_str=COMPLETIONS[1], ground_truth=None, extra_info={}) == \
        pytest.approx(truth(COMPLETIONS[1:])[0], abs=1e-5)


# veRL 0.9.1's own reward code, driven in the framework environment against the service.
VERL_DRIVER = r'''
import json, sys
import numpy as np, torch
from omegaconf import OmegaConf
import verl
from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
from verl.trainer.ppo.reward import get_custom_reward_fn, load_reward_manager
from verl.utils.ray_utils import get_event_loop
from verl.workers.reward_manager.batch import BatchRewardManager
from verl.workers.reward_manager.naive import NaiveRewardManager as LegacyNaiveRewardManager

model_dir, module_path, url, out_path = sys.argv[1:5]
PROMPTS, RESPONSES = json.loads(sys.argv[5]), json.loads(sys.argv[6])


def config(name, manager="naive", path=module_path, **reward_kwargs):
    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": model_dir, "tokenizer_path": None}},
        "reward": {"num_workers": 1,
                   "custom_reward_function": {"path": path, "name": name,
                                              "reward_kwargs": {"url": url, "label": "POSITIVE", **reward_kwargs}},
                   "reward_manager": {"source": "register", "name": manager,
                                      "module": {"path": None, "name": "custom_reward_manager"}},
                   "reward_model": {"enable": False}, "sandbox_fusion": None}})


def rollout_batch(tokenizer):
    """What veRL's rollout hands the reward managers: left-padded prompts, right-padded responses, one mask."""
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    r_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in RESPONSES]
    P, R, pad = max(map(len, p_ids)), max(max(map(len, r_ids)), 1), tokenizer.pad_token_id
    prompts = torch.tensor([[pad] * (P - len(x)) + x for x in p_ids])
    responses = torch.tensor([x + [pad] * (R - len(x)) for x in r_ids])
    mask = torch.tensor([[0] * (P - len(a)) + [1] * (len(a) + len(b)) + [0] * (R - len(b))
                         for a, b in zip(p_ids, r_ids)])
    n = len(PROMPTS)
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": mask,
                 "input_ids": torch.cat([prompts, responses], dim=1)},
        non_tensors={"data_source": np.array(["tiny"] * n, dtype=object),
                     "reward_model": np.array([{"ground_truth": None, "style": "model"}] * n, dtype=object),
                     "extra_info": np.array([{"question": p, "index": i} for i, p in enumerate(PROMPTS)],
                                            dtype=object)})


def placed(reward_tensor, data):
    """Each sample's reward where veRL puts it: on its last response token (0.0 for an empty response)."""
    lengths = data.batch["attention_mask"][:, data.batch["prompts"].shape[1]:].sum(-1)
    return [float(row[n - 1]) if n > 0 else float(row.sum()) for row, n in zip(reward_tensor, lengths.tolist())]


out = {"verl": verl.__version__}
loop = get_event_loop()
data = None
# The reward loop, as the 0.9.1 PPO trainer runs it (a RewardLoopWorker per Ray actor; here in-process).
for key, name, path, extra in [("loop_sync", "compute_score", module_path, {}),
                               ("loop_async", "compute_score_async", module_path, {}),
                               ("loop_pkg", "compute_score", "pkg://shared.frameworks.verl", {}),
                               ("loop_prompt_key", "compute_score", module_path, {"prompt_key": "question"})]:
    worker = RewardLoopWorker(config(name, path=path, **extra))
    if data is None:
        data = rollout_batch(worker.input_tokenizer)
        out["decoded"] = [worker.input_tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(
            data.batch["responses"], data.batch["attention_mask"][:, data.batch["prompts"].shape[1]:].sum(-1))]
    results = loop.run_until_complete(worker.compute_score_batch(data))
    scores = [r["reward_score"] for r in results]
    manager = worker.reward_manager
    out[key] = {"scores": scores, "placed": placed(type(manager).assemble_rm_scores(data, scores), data),
                "manager": type(manager).__name__, "async": manager.is_async_reward_score,
                "acc": [r["reward_extra_info"].get("acc") for r in results]}
tokenizer = worker.input_tokenizer
manager = load_reward_manager(config("compute_score_async", manager="rate_limited"), tokenizer)
out["rate_limited"] = {"manager": type(manager).__name__, "scores": [
    loop.run_until_complete(manager.run_single(data[i:i + 1]))["reward_score"] for i in range(len(data))]}
# The legacy managers (verl.workers.reward_manager) with the function as veRL's loader wraps it.
naive = LegacyNaiveRewardManager(tokenizer, 0, get_custom_reward_fn(config("compute_score")))
out["legacy_naive"] = placed(naive(data), data)
batch = BatchRewardManager(tokenizer, 0, get_custom_reward_fn(config("compute_score_batch")))
out["legacy_batch"] = placed(batch(data), data)
json.dump(out, open(out_path, "w"))
'''


@pytest.mark.timeout(900)  # may build the environment first
def test_verl_reward_managers_score_through_the_service(service, truth, tiny_kit, tmp_path):
    python = framework_python()
    script, out = tmp_path / "drive_verl.py", tmp_path / "verl.json"
    script.write_text(VERL_DRIVER)
    prompts, responses = [*PROMPTS, "In The Forgotten Horizon"], [*COMPLETIONS, ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RAY_DISABLE_IMPORT_WARNING": "1"}
    env.pop("RLHF_REWARD_URL", None)
    done = subprocess.run([str(python), str(script), str(tiny_kit.resolve() / "tiny-gpt2"),
                           str(ROOT / "shared" / "frameworks" / "verl.py"), service.url, str(out),
                           json.dumps(prompts), json.dumps(responses)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    got = json.loads(out.read_text())
    assert got["verl"] == "0.9.1"
    decoded = got["decoded"]  # veRL scores the response as its tokenizer decodes it
    assert decoded[2] == "" and all(decoded[:2])
    expected = [*truth(decoded[:2]), 0.0]  # the empty response: empty_score, never sent
    for key in ("loop_sync", "loop_async", "loop_pkg"):
        assert got[key]["manager"] == "NaiveRewardManager"
        assert got[key]["scores"] == pytest.approx(expected, abs=1e-4), key
        assert got[key]["placed"][:2] == pytest.approx(expected[:2], abs=1e-4), key
        assert got[key]["acc"] == pytest.approx(expected, abs=1e-4)
    assert got["loop_async"]["async"] and not got["loop_sync"]["async"]
    with_prompt = truth([p + r for p, r in zip(prompts, decoded)])
    assert got["loop_prompt_key"]["scores"] == pytest.approx(with_prompt, abs=1e-4)
    assert got["rate_limited"]["manager"] == "RateLimitedRewardManager"
    assert got["rate_limited"]["scores"] == pytest.approx(expected, abs=1e-4)
    assert got["legacy_naive"] == pytest.approx(expected, abs=1e-4)
    assert got["legacy_batch"] == pytest.approx(expected, abs=1e-4)
