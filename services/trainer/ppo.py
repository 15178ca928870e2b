"""PPO math as pure functions on tensors, after trlX's PPO (itself after OpenAI's lm-human-preferences).

Shapes: B = rollouts in the batch, T = response tokens (padded). `mask` (B, T) is 1 on real response tokens (up to
and including the first EOS) and 0 on padding. No function here knows about models, HTTP or files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked elements (Bessel-corrected, as TRL's masked_var)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked elements; padding stays where it was (the caller masks it)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)  # float32 whatever precision the forward pass ran in


def _label_logprobs(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def logprobs_of_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) for each position: logits (B, T, V), labels (B, T) -> (B, T)."""
    return _label_logprobs(_log_softmax(logits), labels)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's distribution: (B, T, V) -> (B, T)."""
    return _entropy(_log_softmax(logits))


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both of the above from one log-softmax: (B, T) each."""
    logp = _log_softmax(logits)
    return _label_logprobs(logp, labels), _entropy(logp)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * (logp - ref_logp) on every response token, plus the score (B,) on the
    last real token (trlX make_experience; Ziegler et al. 2019, eq. 2)."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask  # (B, T)
    last = (mask.sum(1) - 1).clamp(min=0).long()  # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) of each sampled response, summed over its tokens: (B, T) -> (B,).

    Schulman's k3 estimator with r = p_ref / p_policy (samples come from the policy): r - 1 - log r, unbiased and
    never negative. trlX logs exp(log p - log p_ref) - 1 - (log p - log p_ref) instead, which is biased upwards and
    explodes on the tokens the policy came to like most."""
    log_r = (ref_logprobs - logprobs) * mask
    return ((log_r.exp() - 1 - log_r) * mask).sum(1)


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        whiten_advantages: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over (B, T); returns (advantages, returns).

    Past the last real token the value is 0: the episode has ended."""
    values, rewards = values * mask, rewards * mask
    advantages_reversed = []
    last = torch.zeros_like(values[:, 0])  # (B,)
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages_reversed.append(last)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # (B, T)
    returns = advantages + values  # (B, T)
    if whiten_advantages:
        advantages = whiten(advantages, mask) * mask
    return advantages.detach(), returns.detach()


@dataclass
class LossStats:
    policy_loss: float
    value_loss: float
    policy_clipfrac: float
    value_clipfrac: float
    approx_kl: float
    ratio_mean: float


def ppo_losses(*, logprobs: torch.Tensor, values: torch.Tensor, old_logprobs: torch.Tensor,
               old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange: float, cliprange_value: float, vf_coef: float) -> tuple[torch.Tensor, LossStats]:
    """Clipped policy loss plus vf_coef x clipped value loss (Schulman et al. 2017, eq. 7 and 9; trlX PPOConfig.loss).

    Keyword-only: seven same-shaped tensors are easy to swap by position. All tensors (B, T): the minibatch's current
    log-probs and values, the rollouts' (old) ones, advantages, returns and the response mask. Returns the scalar
    loss to minimise and its parts."""
    n = mask.sum().clamp(min=1)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * torch.sum(torch.max(vf_loss1, vf_loss2) * mask) / n
    vf_clipfrac = torch.sum((vf_loss2 > vf_loss1).float() * mask) / n

    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.sum(torch.max(pg_loss1, pg_loss2) * mask) / n
    pg_clipfrac = torch.sum((pg_loss2 > pg_loss1).float() * mask) / n
    with torch.no_grad():
        approx_kl = torch.sum(((ratio - 1) - log_ratio) * mask) / n

    loss = pg_loss + vf_coef * vf_loss
    parts = torch.stack([pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approx_kl, masked_mean(ratio, mask)])
    return loss, LossStats(*parts.detach().tolist())  # one device sync, not six


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_returns).item()


class FixedKLController:
    """A constant KL coefficient (trlX FixedKLController)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Steers the KL coefficient so the KL to the reference tracks `target` (Ziegler et al. 2019, sec. 2.2)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class RunningMoments:
    """Running mean and standard deviation of scores, merged batch by batch (Chan et al. 1979; trlX RunningMoments)."""

    def __init__(self) -> None:
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold in a batch; returns the batch's own mean and std."""
        xs = xs.double()
        xs_count = xs.numel()
        var_t, mean_t = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = float(mean_t.item()), float(var_t.item())
        delta = xs_mean - self.mean
        total = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / total
        self.mean += delta * xs_count / total
        self.var = (old_sum + new_sum) / total
        self.std = math.sqrt(self.var * total / max(total - 1, 1))
        self.count = total
        return xs_mean, math.sqrt(xs_var * xs_count / max(xs_count - 1, 1))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std, self.var, self.count = state["mean"], state["std"], state["var"], state["count"]
