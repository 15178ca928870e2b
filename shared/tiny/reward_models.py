"""Tiny offline reward models of each kind the reward service serves, built in seconds from fixed seeds.

- `tiny-reward-scalar`: a DistilBERT scalar-head reward model (num_labels 1, as OpenAssistant's): tiny-sentiment's
  body with one output, POSITIVE's logit minus NEGATIVE's, so its reward is the sentiment log-odds. Its config.json
  holds `mean` and `std` of its rewards on the held-out corpus, as OpenRLHF saves them.
- `tiny-reward-pair`: a BERT scalar-head model that takes (prompt, response) as a text pair, with token type ids;
  random weights.
- `tiny-reward-gpt2`: a GPT-2 sequence classifier (num_labels 1) on tiny-gpt2's body whose tokenizer and config
  have NO pad token, as openai-community/gpt2: the service must pick one (EOS) and keep config and padding in step.
- `tiny-reward-chat`: a Llama-style sequence classifier (label `reward`) whose tokenizer adds a BOS, has its own
  pad token and a chat template that writes BOS and ends every turn with EOS.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import processors
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DistilBertForSequenceClassification,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _unit_head(linear: torch.nn.Linear, seed: int) -> None:
    """A seeded head whose outputs vary on the scale of 1 (the default 0.02 init gives rewards near 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) / math.sqrt(linear.in_features))
        if linear.bias is not None:
            linear.bias.zero_()


@torch.no_grad()
def write_scalar(tmp: Path, sentiment: Path, texts: list[str]) -> None:
    two = DistilBertForSequenceClassification.from_pretrained(sentiment)
    tokenizer = AutoTokenizer.from_pretrained(sentiment)
    label2id = two.config.label2id or {}
    pos, neg = int(label2id["POSITIVE"]), int(label2id["NEGATIVE"])
    config = two.config.__class__.from_dict({**two.config.to_dict(), "id2label": {0: "LABEL_0"},
                                             "label2id": {"LABEL_0": 0}})
    model = DistilBertForSequenceClassification(config).eval()
    state = {k: v for k, v in two.state_dict().items() if not k.startswith("classifier.")}
    state["classifier.weight"] = two.classifier.weight[pos : pos + 1] - two.classifier.weight[neg : neg + 1]
    state["classifier.bias"] = two.classifier.bias[pos : pos + 1] - two.classifier.bias[neg : neg + 1]
    model.load_state_dict(state)
    rewards = torch.cat([model(**tokenizer(texts[i : i + 128], padding=True, truncation=True,
                                           return_tensors="pt")).logits[:, 0] for i in range(0, len(texts), 128)])
    config.mean, config.std = round(rewards.mean().item(), 6), round(rewards.std().item(), 6)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def write_pair(tmp: Path, sentiment: Path, seed: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(sentiment)
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=tokenizer.model_max_length, type_vocab_size=2, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0}, initializer_range=0.1,  # one label: a scalar head
    )
    model = BertForSequenceClassification(config).eval()
    _unit_head(model.classifier, seed)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def write_gpt2(tmp: Path, policy: Path, seed: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    model = GPT2ForSequenceClassification.from_pretrained(policy, num_labels=1, pad_token_id=None).eval()
    _unit_head(model.score, seed)
    model.config.pad_token_id = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def write_chat(tmp: Path, policy: Path, seed: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.add_special_tokens({"bos_token": "<s>", "pad_token": "<pad>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, id2label={0: "reward"}, label2id={"reward": 0},
        tie_word_embeddings=False, initializer_range=0.1,
    )
    model = LlamaForSequenceClassification(config).eval()
    _unit_head(model.score, seed)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
