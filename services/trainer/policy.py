"""The policy with a scalar value head, its frozen reference (a full copy, or trlX's "hydra" head over the frozen
trunk), and the rollout forward pass."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import PreTrainedModel

from services.trainer.ppo import logprobs_and_entropy, logprobs_of_labels
from shared.modeling import load_causal_lm_model, load_causal_lm_tokenizer


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a value head on its last hidden state (trlX: Linear(h, 2h) -> ReLU -> Linear(2h, 1))."""

    def __init__(self, base: PreTrainedModel, hidden: int | None = None):
        super().__init__()
        self.base = base
        width = base.config.hidden_size
        hidden = hidden or 2 * width
        # float32 whatever the model's dtype: a bf16/fp16 checkpoint must not make the critic half precision
        self.value_head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1)).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits (B, K, V) and values (B, K) of the last K = `keep` positions (0: all L), and every layer's hidden
        states (B, L, H) (what a hydra reference continues from), for left-padded sequences. PPO needs only the
        positions that predict the response: the LM head skips the prompt's (with a 50k vocabulary it is a third
        of GPT-2 small's compute)."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                        output_hidden_states=True, use_cache=False, logits_to_keep=keep)
        last = out.hidden_states[-1][:, -keep:]  # -0: all positions
        with torch.autocast(last.device.type, enabled=False):  # the critic is float32 under mixed precision too
            values = self.value_head(last.float()).squeeze(-1)
        return out.logits, values, out.hidden_states


class Float32Head(nn.Linear):
    """An output layer (LM head) that runs in float32 under autocast. Log-probabilities over a 50k vocabulary from
    bf16 logits (8 mantissa bits: steps of 0.06 at a logit of 10) are too coarse for PPO's ratios and KL; in the
    tiny preset's 5-seed check, bf16 with a bf16 head ended below float32's range and with this head inside it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def float32_output_head(model: PreTrainedModel) -> None:
    """Make the model's output layer a Float32Head in place: same weights, ties and state_dict, and copies keep it.
    A head that is not a plain Linear is left as it is."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = Float32Head


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them; without this a padded row's log-probs would
    not be those of the text that was sampled."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)


def load_policy_and_tokenizer(path: str, revision: str | None = None, tokenizer_path: str | None = None):
    """`load_policy`'s model and its tokenizer (from `tokenizer_path` when given), set up for left-padded rollouts."""
    tokenizer = load_causal_lm_tokenizer(tokenizer_path or path, revision=revision)  # first: it fails fast
    return load_policy(path, revision), tokenizer


def load_policy(path: str, revision: str | None = None) -> PreTrainedModel:
    """The model to train, in float32 whatever dtype it was saved in: these are the master weights AdamW updates
    (in fp16 its eps underflows to 0 and untouched rows turn NaN), and checkpoints keep full precision. Eval mode
    for good: sampling, scoring and updates all see the same policy."""
    return load_causal_lm_model(path, revision=revision, dtype=torch.float32)


# -- which layers train, and the reference they are measured against ---------------------------------------------------

_FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm")
_POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")


def decoder_blocks(model: PreTrainedModel) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the model's list of decoder blocks: its ModuleList of num_hidden_layers."""
    for parent in model.base_model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == model.config.num_hidden_layers:
                return parent, name
    raise ValueError(f"model.num_layers_unfrozen: cannot find the decoder blocks of {type(model).__name__}; use -1")


def _final_norm(model: PreTrainedModel) -> nn.Module:
    for parent in model.base_model.modules():
        for name in _FINAL_NORMS:
            if isinstance(getattr(parent, name, None), nn.Module):
                return getattr(parent, name)
    raise ValueError(f"model.num_layers_unfrozen: cannot find the final norm of {type(model).__name__}; use -1")


def freeze_trunk(model: PreTrainedModel, num_layers_unfrozen: int) -> None:
    """trlX's `num_layers_unfrozen`: N > 0 trains only the top N blocks, the final norm and an output head that is
    not tied to the input embeddings; the embeddings (token and position) and every lower block are frozen. (trlX
    leaves the position embeddings trainable: then the trunk's hidden states drift, and so does its hydra
    reference.) 0 trains only the final norm, as trlX; -1 trains everything."""
    if num_layers_unfrozen < 0:
        return
    parent, name = decoder_blocks(model)
    blocks = list(getattr(parent, name))
    model.requires_grad_(False)
    for block in blocks[len(blocks) - min(num_layers_unfrozen, len(blocks)):]:
        block.requires_grad_(True)
    _final_norm(model).requires_grad_(True)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if num_layers_unfrozen > 0 and head is not None and head.weight is not embeddings.weight:
        head.requires_grad_(True)


class FullReference:
    """A full frozen copy of the initial model: the reference the KL penalty is measured against."""

    def __init__(self, model: PreTrainedModel):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def to(self, device) -> FullReference:
        self.model.to(device)
        return self

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states=None,
               keep: int = 0) -> torch.Tensor:
        """Logits of the last `keep` positions (0: all), as the policy's forward."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False, logits_to_keep=keep).logits


class HydraReference(FullReference):
    """trlX's hydra head: a frozen copy of the top N blocks, the final norm and the LM head, run on the hidden state
    the policy's frozen trunk already computed (its forward pass feeds it: no second pass through the trunk).

    It is the same architecture with only the top N blocks and its position embeddings zeroed, fed the trunk's hidden
    state as `inputs_embeds`: the trunk's output already holds the positions, and the blocks still get the position
    ids and padding mask (rotary models apply positions inside attention)."""

    def __init__(self, model: PreTrainedModel, num_layers_unfrozen: int):
        total = model.config.num_hidden_layers
        self.top = min(num_layers_unfrozen, total)
        self.trunk_index = total - self.top  # hidden_states[k] is the input of block k
        head = copy.deepcopy(model).eval().requires_grad_(False)
        parent, name = decoder_blocks(head)
        setattr(parent, name, nn.ModuleList(list(getattr(parent, name))[self.trunk_index:]))
        head.config.num_hidden_layers = self.top
        for module in head.base_model.modules():
            for attr in _POSITION_EMBEDDINGS:
                if isinstance(getattr(module, attr, None), nn.Embedding):
                    getattr(module, attr).weight.data.zero_()
        self.model = head

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states=None,
               keep: int = 0) -> torch.Tensor:
        return self.model(inputs_embeds=hidden_states[self.trunk_index].to(self.model.dtype),
                          attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                          use_cache=False, logits_to_keep=keep).logits


def make_reference(model: PreTrainedModel, num_layers_unfrozen: int):
    """The reference for `num_layers_unfrozen`: a hydra head when N > 0 (checked against a full copy on a left-padded
    probe batch; an architecture it does not reproduce gets the full copy, with a warning), else a full copy."""
    if num_layers_unfrozen <= 0:
        return FullReference(model)
    hydra = HydraReference(model, num_layers_unfrozen)
    error = _reference_error(model, hydra)
    if error <= 1e-4:
        return hydra
    logging.getLogger(__name__).warning(
        "the hydra reference of %s differs from the model by %.2g; using a full frozen copy instead (correct, "
        "slower)", type(model).__name__, error)
    return FullReference(model)


@torch.no_grad()
def _reference_error(model: PreTrainedModel, hydra: HydraReference) -> float:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True,
                use_cache=False)
    diff = (hydra.logits(ids, mask, out.hidden_states).float() - out.logits.float()).abs()
    return diff[mask.bool()].max().item()


def response_keep(sequences: torch.Tensor, query_len: int) -> int:
    """How many trailing positions predict the response (Q-1..L-1: R + 1), for `keep=`."""
    return sequences.shape[1] - query_len + 1


def response_logits(logits: torch.Tensor, sequences: torch.Tensor, query_len: int) -> torch.Tensor:
    """The logits (B, R, V) at positions Q-1..L-2, which predict response tokens Q..L-1; `logits` may hold all L
    positions or only the last `response_keep` of them."""
    return logits[:, -response_keep(sequences, query_len) : -1]


def response_values(values: torch.Tensor, sequences: torch.Tensor, query_len: int) -> torch.Tensor:
    """The values (B, R) of the states before each response token, from all L positions or the last kept ones."""
    return values[:, -response_keep(sequences, query_len) : -1]


def response_logprobs(logits: torch.Tensor, sequences: torch.Tensor, query_len: int) -> torch.Tensor:
    """log p of each response token (B, R)."""
    return logprobs_of_labels(response_logits(logits, sequences, query_len), sequences[:, query_len:])


def response_logprobs_and_entropy(logits: torch.Tensor, sequences: torch.Tensor,
                                  query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logprobs` and the entropy of each response position (B, R)."""
    return logprobs_and_entropy(response_logits(logits, sequences, query_len), sequences[:, query_len:])


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS; 0 after it (generate pads with EOS). (B, R)"""
    is_eos = (responses == eos_id).long()
    after_first_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_first_eos).float()
