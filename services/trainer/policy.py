"""The policy with a scalar value head, its frozen reference, and the rollout forward pass."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from services.trainer.ppo import entropy_from_logits, logprobs_of_labels
from shared.modeling import load_pretrained


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a value head on its last hidden state (trlX: Linear(h, 2h) -> ReLU -> Linear(2h, 1))."""

    def __init__(self, base: PreTrainedModel, hidden: int | None = None):
        super().__init__()
        self.base = base
        width = base.config.hidden_size
        hidden = hidden or 2 * width
        self.value_head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, L, V) and values (B, L) for left-padded sequences."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                        output_hidden_states=True, use_cache=False)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them; without this a padded row's log-probs would
    not be those of the text that was sampled."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)


def load_policy_and_tokenizer(path: str, revision: str | None = None, tokenizer_path: str | None = None):
    tokenizer = load_pretrained(AutoTokenizer, tokenizer_path or path, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = load_pretrained(AutoModelForCausalLM, path, revision=revision)
    model.eval()  # dropout off for good: sampling, scoring and updates all see the same policy
    return model, tokenizer


def frozen_reference(model: PreTrainedModel) -> PreTrainedModel:
    """A full frozen copy: the reference the KL penalty is measured against."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def response_logprobs(logits: torch.Tensor, sequences: torch.Tensor, query_len: int) -> torch.Tensor:
    """log p of each response token: logits (B, L, V) at positions Q-1..L-2 predict tokens Q..L-1 -> (B, R)."""
    return logprobs_of_labels(logits[:, query_len - 1 : -1], sequences[:, query_len:])


def response_entropy(logits: torch.Tensor, query_len: int) -> torch.Tensor:
    return entropy_from_logits(logits[:, query_len - 1 : -1])  # (B, R)


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS; 0 after it (generate pads with EOS). (B, R)"""
    is_eos = (responses == eos_id).long()
    after_first_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_first_eos).float()
