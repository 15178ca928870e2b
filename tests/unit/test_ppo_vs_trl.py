"""Our PPO math against trl 0.11.4's legacy PPOTrainer, used as an oracle (skipped where trl is not installed)."""

from __future__ import annotations

import types

import pytest
import torch

from services.trainer.ppo import AdaptiveKLController, gae, kl_penalized_rewards, ppo_losses

trl_ppo = pytest.importorskip("trl.trainer.ppo_trainer")
PPOTrainer = trl_ppo.PPOTrainer


def fake_trl(kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=1.0):
    """Just enough of a trl PPOTrainer for its math methods: config values and a KL controller."""
    config = types.SimpleNamespace(kl_penalty="kl", whiten_rewards=False, gamma=gamma, lam=lam, cliprange=cliprange,
                                   cliprange_value=cliprange_value, vf_coef=vf_coef, ratio_threshold=10.0)
    fake = types.SimpleNamespace(config=config, kl_ctl=types.SimpleNamespace(value=kl_coef))
    fake._kl_penalty = types.MethodType(PPOTrainer._kl_penalty, fake)
    return fake


def batch(seed: int, lengths=(6, 3, 1, 5)):
    torch.manual_seed(seed)
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    old_lp = -torch.rand(len(lengths), width) * 4
    return {
        "mask": mask, "scores": torch.randn(len(lengths)), "old_logprobs": old_lp,
        "logprobs": old_lp + torch.randn_like(old_lp) * 0.3, "ref_logprobs": old_lp + torch.randn_like(old_lp) * 0.2,
        "values": torch.randn(len(lengths), width), "vpreds": torch.randn(len(lengths), width),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_penalised_rewards_match_trl(seed):
    b = batch(seed)
    ours = kl_penalized_rewards(b["scores"], b["logprobs"], b["ref_logprobs"], b["mask"], kl_coef=0.05)
    theirs, _, _ = PPOTrainer.compute_rewards(fake_trl(kl_coef=0.05), b["scores"], b["logprobs"], b["ref_logprobs"],
                                              b["mask"])
    assert torch.allclose(ours * b["mask"], theirs * b["mask"], atol=1e-6)


@pytest.mark.parametrize("seed, gamma, lam", [(0, 1.0, 0.95), (1, 0.99, 0.9), (2, 1.0, 1.0)])
def test_advantages_and_returns_match_trl(seed, gamma, lam):
    b = batch(seed)
    rewards = torch.randn_like(b["values"])
    ours_adv, ours_ret = gae(b["values"], rewards, b["mask"], gamma, lam)
    _, theirs_adv, theirs_ret = PPOTrainer.compute_advantages(fake_trl(gamma=gamma, lam=lam), b["values"].clone(),
                                                              rewards.clone(), b["mask"])
    m = b["mask"].bool()
    assert torch.allclose(ours_adv[m], theirs_adv[m], atol=1e-5)
    assert torch.allclose(ours_ret[m], theirs_ret[m], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_losses_match_trl(seed):
    b = batch(seed)
    advantages, returns = torch.randn_like(b["values"]), torch.randn_like(b["values"])
    trl = fake_trl(cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)
    logits = torch.randn(*b["values"].shape, 11)
    pg, vf, stats = PPOTrainer.loss(trl, b["old_logprobs"], b["values"], logits, b["vpreds"], b["logprobs"],
                                    b["mask"], advantages, returns)
    loss, ours = ppo_losses(logprobs=b["logprobs"], values=b["vpreds"], old_logprobs=b["old_logprobs"],
                            old_values=b["values"], advantages=advantages, returns=returns, mask=b["mask"],
                            cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)
    assert ours.policy_loss == pytest.approx(pg.item(), abs=1e-6)
    assert 0.5 * ours.value_loss == pytest.approx(vf.item(), abs=1e-6)
    assert loss.item() == pytest.approx((pg + vf).item(), abs=1e-6)
    assert ours.policy_clipfrac == pytest.approx(stats["policy/clipfrac"].item(), abs=1e-6)
    assert ours.value_clipfrac == pytest.approx(stats["val/clipfrac"].item(), abs=1e-6)


def test_adaptive_kl_controller_matches_trl():
    ours = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    theirs = trl_ppo.AdaptiveKLController(0.2, 6.0, 10000)
    for kl, n in [(1.0, 64), (12.0, 64), (6.3, 128), (0.0, 32), (50.0, 256)]:
        ours.update(kl, n)
        theirs.update(kl, n)
        assert ours.value == pytest.approx(theirs.value, rel=1e-12)
