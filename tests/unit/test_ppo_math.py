"""PPO math against hand-computed values and plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalized_rewards,
    logprobs_of_labels,
    masked_mean,
    masked_var,
    ppo_losses,
    sequence_kl,
    whiten,
)


def loop_gae(values, rewards, lengths, gamma, lam):
    """GAE one episode at a time with Python floats: the textbook recursion, no masks."""
    advs, rets = [], []
    for v, r, n in zip(values.tolist(), rewards.tolist(), lengths):
        adv, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            last = r[t] + gamma * next_v - v[t] + gamma * lam * last
            adv[t] = last
        advs.append(adv)
        rets.append([a + x for a, x in zip(adv, v[:n])])
    return advs, rets


def mask_of(lengths, width):
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])


def test_gae_by_hand():
    # One episode of two tokens, gamma 1, lam 1: advantages are returns-to-go minus values.
    values = torch.tensor([[0.5, 0.2]])
    rewards = torch.tensor([[0.1, 1.0]])
    adv, ret = gae(values, rewards, torch.ones(1, 2), gamma=1.0, lam=1.0, whiten_advantages=False)
    # t=1: 1.0 + 0 - 0.2 = 0.8; t=0: 0.1 + 0.2 - 0.5 + 0.8 = 0.6
    assert adv.tolist() == [[pytest.approx(0.6), pytest.approx(0.8)]]
    assert ret.tolist() == [[pytest.approx(1.1), pytest.approx(1.0)]]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_a_per_episode_loop_with_padding(gamma, lam):
    torch.manual_seed(0)
    lengths = [5, 1, 3, 7]
    values, rewards = torch.randn(4, 7), torch.randn(4, 7)
    mask = mask_of(lengths, 7)
    adv, ret = gae(values, rewards, mask, gamma, lam, whiten_advantages=False)
    ref_adv, ref_ret = loop_gae(values, rewards, lengths, gamma, lam)
    for i, n in enumerate(lengths):
        assert adv[i, :n].tolist() == pytest.approx(ref_adv[i], abs=1e-5)
        assert ret[i, :n].tolist() == pytest.approx(ref_ret[i], abs=1e-5)
        assert adv[i, n:].abs().sum() == 0  # padding carries nothing


def test_whitened_advantages_have_zero_mean_unit_variance_on_real_tokens():
    torch.manual_seed(1)
    mask = mask_of([4, 2, 6], 6)
    adv, _ = gae(torch.randn(3, 6), torch.randn(3, 6) * 5 + 3, mask, 1.0, 0.95)
    assert masked_mean(adv, mask).item() == pytest.approx(0, abs=1e-5)
    assert masked_var(adv, mask).item() == pytest.approx(1, abs=1e-4)


def test_whiten_and_masked_moments_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased: ((1 + 0 + 1) / 2)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    w = whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)
    assert whiten(x, mask, shift_mean=False)[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-4)


def test_kl_penalty_with_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -9.0]])
    mask = mask_of([3, 2], 3)
    rewards = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref): row 0: -0.05, 0.1, 0; row 1: -0.1, 0, (pad)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 0.0 + 2.0])
    assert rewards[1].tolist() == pytest.approx([-0.1, 0.0 - 1.0, 0.0])


def test_sequence_kl_is_zero_for_identical_policies_and_positive_otherwise():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    mask = torch.ones(1, 3)
    assert sequence_kl(lp, lp, mask).item() == 0.0
    ref = lp + torch.tensor([[0.3, -0.2, 0.0]])  # log r = ref - policy
    by_hand = sum(math.exp(d) - 1 - d for d in (0.3, -0.2, 0.0))
    assert sequence_kl(lp, ref, mask).item() == pytest.approx(by_hand, abs=1e-6)


def test_sequence_kl_estimates_the_true_kl():
    """Averaged over samples from the policy, it converges to KL(policy || reference) of two categoricals."""
    torch.manual_seed(4)
    policy = torch.tensor([0.7, 0.2, 0.1])
    ref = torch.tensor([0.2, 0.5, 0.3])
    tokens = torch.multinomial(policy, 200_000, replacement=True)
    lp, ref_lp = policy.log()[tokens][:, None], ref.log()[tokens][:, None]
    estimate = sequence_kl(lp, ref_lp, torch.ones_like(lp)).mean().item()
    true_kl = (policy * (policy / ref).log()).sum().item()
    assert estimate == pytest.approx(true_kl, rel=0.02)


def loop_losses(lp, v, old_lp, old_v, adv, ret, lengths, clip, clip_v, vf_coef):
    """The clipped objectives token by token, with Python floats."""
    pg, vf, pg_clipped, vf_clipped, n = 0.0, 0.0, 0, 0, 0
    for i, length in enumerate(lengths):
        for t in range(length):
            ratio = math.exp(lp[i][t] - old_lp[i][t])
            a = adv[i][t]
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip)
            pg += max(unclipped, clipped)
            pg_clipped += clipped > unclipped
            v_clip = min(max(v[i][t], old_v[i][t] - clip_v), old_v[i][t] + clip_v)
            l1, l2 = (v[i][t] - ret[i][t]) ** 2, (v_clip - ret[i][t]) ** 2
            vf += max(l1, l2)
            vf_clipped += l2 > l1
            n += 1
    return pg / n + vf_coef * 0.5 * vf / n, pg / n, 0.5 * vf / n, pg_clipped / n, vf_clipped / n


def test_clipped_losses_match_a_token_loop():
    torch.manual_seed(2)
    lengths = [4, 2, 5]
    mask = mask_of(lengths, 5)
    old_lp = -torch.rand(3, 5) * 3
    lp = old_lp + torch.randn(3, 5) * 0.4  # ratios well outside [0.8, 1.2] for some tokens
    old_v, v = torch.randn(3, 5), torch.randn(3, 5)
    adv, ret = torch.randn(3, 5), torch.randn(3, 5)
    loss, stats = ppo_losses(logprobs=lp, values=v, old_logprobs=old_lp, old_values=old_v, advantages=adv, returns=ret,
                             mask=mask, cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)
    ref = loop_losses(lp.tolist(), v.tolist(), old_lp.tolist(), old_v.tolist(), adv.tolist(), ret.tolist(),
                      lengths, 0.2, 0.2, 0.5)
    assert loss.item() == pytest.approx(ref[0], abs=1e-5)
    assert (stats.policy_loss, stats.value_loss) == (pytest.approx(ref[1], abs=1e-5), pytest.approx(ref[2], abs=1e-5))
    assert (stats.policy_clipfrac, stats.value_clipfrac) == (pytest.approx(ref[3]), pytest.approx(ref[4]))
    assert 0 < stats.policy_clipfrac < 1 and 0 < stats.value_clipfrac < 1


def test_losses_at_the_old_policy_are_the_plain_objectives():
    # ratio 1 everywhere: policy loss is -mean(advantage), nothing clipped, approx KL 0.
    lp = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[1.0, 3.0]])
    v = torch.tensor([[0.5, 0.5]])
    ret = torch.tensor([[1.5, -0.5]])
    loss, stats = ppo_losses(logprobs=lp, values=v, old_logprobs=lp, old_values=v, advantages=adv, returns=ret,
                             mask=torch.ones(1, 2), cliprange=0.2, cliprange_value=0.2, vf_coef=1.0)
    assert stats.policy_loss == pytest.approx(-2.0)
    assert stats.value_loss == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert stats.approx_kl == 0 and stats.policy_clipfrac == 0 and stats.ratio_mean == pytest.approx(1)
    assert loss.item() == pytest.approx(-2.0 + 0.5)


def test_policy_gradient_is_zero_once_the_ratio_is_clipped_in_the_advantage_direction():
    old = torch.tensor([[-1.0]])
    lp = torch.tensor([[-1.0 + math.log(1.5)]], requires_grad=True)  # ratio 1.5 > 1.2
    loss, _ = ppo_losses(logprobs=lp, values=torch.zeros(1, 1), old_logprobs=old, old_values=torch.zeros(1, 1),
                         advantages=torch.ones(1, 1), returns=torch.zeros(1, 1), mask=torch.ones(1, 1), cliprange=0.2,
                         cliprange_value=0.2, vf_coef=0.0)
    loss.backward()
    assert lp.grad.item() == 0.0


def test_losses_take_keywords_only():
    # seven same-shaped tensors: by position, a swapped pair would compute a plausible, wrong loss
    x = torch.zeros(1, 1)
    with pytest.raises(TypeError, match="positional"):
        ppo_losses(x, x, x, x, x, x, x, 0.2, 0.2, 1.0)


def test_logprobs_and_entropy_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    labels = torch.tensor([[0, 1]])
    assert logprobs_of_labels(logits, labels).tolist() == [[pytest.approx(math.log(0.5)), pytest.approx(math.log(0.8))]]
    ent = entropy_from_logits(logits)[0].tolist()
    assert ent[0] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert ent[1] == pytest.approx(-(0.8 * math.log(0.8) + 2 * 0.1 * math.log(0.1)))


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), ret, mask) == pytest.approx(0.0)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl.value == pytest.approx(0.2 * 1.002 * (1 - 0.1 * 0.01))
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.001)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.001


def test_running_moments_match_the_whole_stream():
    torch.manual_seed(3)
    chunks = [torch.randn(n) * 2 + 1 for n in (5, 17, 3, 40)]
    rm = RunningMoments()
    for c in chunks:
        batch_mean, batch_std = rm.update(c)
        assert batch_mean == pytest.approx(c.mean().item(), abs=1e-6)
        assert batch_std == pytest.approx(c.std().item(), abs=1e-6)
    everything = torch.cat(chunks)
    assert rm.mean == pytest.approx(everything.mean().item(), abs=1e-6)
    assert rm.std == pytest.approx(everything.std().item(), abs=1e-5)
