"""Small, seeded training loops for the tiny policy and the tiny classifiers (CPU, a minute or two each)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from shared.tiny.corpus import Review


def _batches(items: list, batch_size: int, rng: random.Random) -> list[list]:
    order = items[:]
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def train_policy(
    reviews: list[Review], tokenizer: PreTrainedTokenizerFast, *, epochs: int, seed: int,
    n_embd: int = 128, n_layer: int = 2, n_head: int = 4, batch_size: int = 32, block_size: int = 96,
    lr: float = 3e-3,
) -> GPT2LMHeadModel:
    """A GPT-2 language model of the corpus, trained as GPT-2 was: reviews joined by `<eos>` into one stream, cut
    into blocks at a random offset each epoch. So any token can stand at position 0, and a prompt without a BOS
    token continues as well as one with it (as with the real GPT-2)."""
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=tokenizer.model_max_length, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    stream = [eos]
    for ids in tokenizer([r.text for r in reviews])["input_ids"]:
        stream += ids + [eos]
    stream_t = torch.tensor(stream)
    blocks_per_epoch = (len(stream) - 1) // block_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((blocks_per_epoch + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    rng = random.Random(seed)
    for _ in range(epochs):
        offset = rng.randrange(block_size)
        usable = (len(stream) - offset) // block_size * block_size
        blocks = stream_t[offset : offset + usable].view(-1, block_size)  # (N, T)
        order = list(range(len(blocks)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            ids = blocks[order[i : i + batch_size]]  # (B, T)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if schedule.last_epoch + 1 < steps:
                schedule.step()
            optimizer.zero_grad()
    model.eval()
    return model


def train_classifier(
    reviews: list[Review], tokenizer: PreTrainedTokenizerFast, *, id2label: dict[int, str],
    targets: dict[str, list[float]], epochs: int, seed: int, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
    batch_size: int = 32, lr: float = 5e-4,
) -> DistilBertForSequenceClassification:
    """A DistilBERT classifier trained on soft targets: `targets[review.label]` is the wanted distribution over
    `id2label`. Soft targets let a two-label model learn that a neutral review is 50/50, not a coin flip."""
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, dim=dim, n_layers=n_layers,
        n_heads=n_heads, hidden_dim=4 * dim, pad_token_id=tokenizer.pad_token_id, id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    model = DistilBertForSequenceClassification(config)
    examples = list(zip([r.text for r in reviews], [targets[r.label] for r in reviews]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    rng = random.Random(seed)
    for _ in range(epochs):
        for batch in _batches(examples, batch_size, rng):
            texts, soft = zip(*batch)
            enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            logits = model(**enc).logits
            loss = F.cross_entropy(logits, torch.tensor(soft))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    return model


@torch.no_grad()
def predict_proba(model, tokenizer, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Probabilities, (N, num_labels), in the model's label order."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, return_tensors="pt")
        out.append(model(**enc).logits.softmax(-1))
    return torch.cat(out)
