"""The PPO loop on the tiny policy with in-process reward functions: the properties a silent bug would break."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from services.trainer.config import load_config
from services.trainer.data import PromptSampler
from services.trainer.loop import PPOTrainer
from services.trainer.policy import PolicyWithValueHead, freeze_trunk, load_policy_and_tokenizer, make_reference
from services.trainer.rewards import RewardError
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PROMPTS = ["I watched The", "The story follows a", "This comedy", "We went to see The", "I saw The Quiet",
           "The film The Golden", "In The Silent Mirror,", "My review of"]


def length_reward(samples, prompts, outputs, **kw):
    return [min(len(o), 40) / 40 for o in outputs]


def make_trainer(tiny_kit, reward_fn=length_reward, **overrides) -> PPOTrainer:
    sets = [f"{k}={v}" for k, v in overrides.items()]
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", "method.num_rollouts=16", "method.chunk_size=8",
        "train.batch_size=8", "method.ppo_epochs=2", "method.gen_kwargs.max_new_tokens=12", *sets])
    torch.manual_seed(config.train.seed)
    base, tokenizer = load_policy_and_tokenizer(config.model.model_path)
    reference = make_reference(base, config.model.num_layers_unfrozen)
    freeze_trunk(base, config.model.num_layers_unfrozen)
    policy = PolicyWithValueHead(base)
    return PPOTrainer(config, policy, reference, tokenizer, reward_fn,
                      PromptSampler(PROMPTS, config.train.seed), PROMPTS[:4])


def params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.policy.parameters()]


def test_first_rollout_has_exactly_zero_kl_to_the_reference(tiny_kit):
    trainer = make_trainer(tiny_kit)
    stats = trainer.step()
    assert stats["objective/kl"] == 0.0
    second = trainer.step()
    assert second["objective/kl"] > 0  # and the policy did move


def test_rollout_logprobs_are_those_of_the_sampling_distribution(tiny_kit):
    """Forward log-probs of left-padded rollouts equal generate's own scores: padding and positions are right."""
    trainer = make_trainer(tiny_kit, **{"train.mixed_precision": "no"})  # generate's scores are float32 here
    tok = trainer.tokenizer
    enc = tok(PROMPTS[:4], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = trainer.policy.base.generate(**enc, do_sample=True, top_k=0, max_new_tokens=8, pad_token_id=tok.eos_token_id,
                                       output_scores=True, return_dict_in_generate=True)
    responses = out.sequences[:, enc.input_ids.shape[1]:]
    from_generate = torch.stack([s.log_softmax(-1) for s in out.scores], 1).gather(2, responses.unsqueeze(-1))[..., 0]
    from services.trainer.loop import Rollouts
    from services.trainer.policy import response_mask

    mask = response_mask(responses, tok.eos_token_id)
    rollouts = Rollouts(PROMPTS[:4], [""] * 4, enc.input_ids, enc.attention_mask, responses, mask)
    logprobs, _, _, ref_logprobs = trainer.policy_forward(rollouts)
    assert torch.allclose(logprobs * mask, from_generate * mask, atol=1e-4)
    assert torch.allclose(ref_logprobs * mask, logprobs * mask, atol=1e-5)


def short_reward(samples, prompts, outputs, **kw):
    return [1 - min(len(o), 60) / 60 for o in outputs]


def test_the_reward_moves_the_policy_the_right_way(tiny_kit):
    # float32: a threshold on one sampled trajectory, which bf16 rounding sends elsewhere after a few iterations
    # (bf16's learning is compared across seeds by bench/ppo.py --part learning); `auto` would make it per-CPU.
    trainer = make_trainer(tiny_kit, reward_fn=short_reward, **{
        "optimizer.kwargs.lr": 3e-4, "method.init_kl_coef": 0.01, "train.mixed_precision": "no"})
    start = trainer.evaluate()
    for _ in range(8):
        trainer.step()
    end = trainer.evaluate()
    assert end["eval/reward_mean"] > start["eval/reward_mean"] + 0.1  # shorter outputs earn more
    assert end["eval/response_length"] < start["eval/response_length"]


@pytest.mark.parametrize("bad", [
    lambda samples, **kw: [0.5] * (len(samples) - 1),
    lambda samples, **kw: [0.5] * (len(samples) - 1) + [math.nan],
    lambda samples, **kw: [0.5] * (len(samples) - 1) + [math.inf],
    lambda samples, **kw: ["high"] * len(samples),
    lambda samples, **kw: None,
])
def test_a_broken_reward_is_a_clear_error_and_no_update(tiny_kit, bad):
    trainer = make_trainer(tiny_kit, reward_fn=bad)
    before = params(trainer)
    with pytest.raises(RewardError, match="reward function returned"):
        trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params(trainer)))
    assert trainer.iteration == 0


def test_same_seed_same_run(tiny_kit):
    a = make_trainer(tiny_kit)  # seeds torch, as train() does at the start of a run
    sa = [a.step() for _ in range(2)]
    b = make_trainer(tiny_kit)
    sb = [b.step() for _ in range(2)]
    for x, y in zip(sa, sb):
        assert x["rollout/reward_mean"] == y["rollout/reward_mean"]
        assert x["ppo/policy/loss"] == pytest.approx(y["ppo/policy/loss"], abs=1e-6)


def test_state_dict_round_trip_continues_identically(tiny_kit):
    a = make_trainer(tiny_kit)
    a.step()
    state = copy.deepcopy(a.state_dict())  # a checkpoint is a copy; state_dict() holds live tensors
    weights = {k: v.clone() for k, v in a.policy.base.state_dict().items()}
    after_a = a.step()
    b = make_trainer(tiny_kit)
    b.policy.base.load_state_dict(weights)
    b.load_state_dict(state)
    after_b = b.step()
    assert b.iteration == a.iteration == 2
    assert after_a["rollout/reward_mean"] == after_b["rollout/reward_mean"]
    assert after_a["ppo/policy/loss"] == pytest.approx(after_b["ppo/policy/loss"], abs=1e-5)
