"""The torch side of the reward service: tokenize, run a sequence classifier, turn logits into scores."""

from __future__ import annotations

import contextlib
import threading

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from shared.modeling import ModelLoadError, load_pretrained
from shared.schemas import ModelSpec

DEFAULT_REWARD_LABEL = "POSITIVE"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TextTooLongError(ValueError):
    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(f"texts[{index}] has {tokens} tokens, more than the model's max_length {limit}; "
                         f"send truncate=true or shorten it")


def resolve_label(id2label: dict[int, str], wanted: str | None) -> int:
    """The index of the label called `wanted`: exact name first, then a unique case-insensitive match."""
    wanted = wanted or DEFAULT_REWARD_LABEL
    exact = [i for i, name in id2label.items() if name == wanted]
    loose = [i for i, name in id2label.items() if name.lower() == wanted.lower()]
    found = exact or loose
    if len(found) != 1:
        names = ", ".join(repr(n) for n in id2label.values())
        raise ModelLoadError(f"the model has no single label named {wanted!r}; its labels are {names}")
    return int(found[0])


class Scorer:
    """One loaded classifier. `forward` runs in the batcher's worker thread; everything else on the event loop."""

    def __init__(self, spec: ModelSpec, device: str = "cpu"):
        self.spec = spec
        self.device = device
        self.tokenizer = load_pretrained(AutoTokenizer, spec.source, revision=spec.revision)
        self.model = load_pretrained(AutoModelForSequenceClassification, spec.source, revision=spec.revision)
        self.model.to(device).eval()
        config = self.model.config
        self.id2label = {int(k): v for k, v in config.id2label.items()}
        self.label_index = resolve_label(self.id2label, spec.label)
        self.label = self.id2label[self.label_index]
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.max_length = self._max_length(spec.max_length)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (config.pad_token_id or 0)
        self._lock = threading.Lock()  # one forward at a time even if a model is shared by two batchers

    def _max_length(self, requested: int | None) -> int:
        limits = [n for n in (getattr(self.model.config, "max_position_embeddings", None),) if n]
        tok_limit = self.tokenizer.model_max_length
        if tok_limit and tok_limit < 1_000_000:  # transformers uses a huge sentinel when the tokenizer has no limit
            limits.append(tok_limit)
        if requested:
            if limits and requested > min(limits):
                raise ModelLoadError(f"max_length {requested} exceeds the model's limit {min(limits)}")
            return requested
        return min(limits) if limits else 512

    def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Token ids with special tokens; longer than max_length -> cut (truncate) or TextTooLongError."""
        if truncate:
            return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        ids = self.tokenizer(texts, truncation=False)["input_ids"]
        for i, seq in enumerate(ids):
            if len(seq) > self.max_length:
                raise TextTooLongError(i, len(seq), self.max_length)
        return ids

    def _autocast(self):
        if self.spec.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=_DTYPES[self.spec.dtype])

    @torch.inference_mode()
    def forward(self, batch: list[list[int]]) -> list[list[float]]:
        """Logits for each sequence, (B, num_labels), as float lists. Right padding with an attention mask."""
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        with self._lock, self._autocast():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return logits.float().cpu().tolist()  # (B, num_labels)

    def probabilities(self, logits: list[list[float]]) -> torch.Tensor:
        """(N, num_labels): softmax over labels, or independent sigmoids for a multi-label model."""
        x = torch.tensor(logits, dtype=torch.float32)
        return x.sigmoid() if self.multi_label else x.softmax(-1)

    def scores(self, logits: list[list[float]], label_index: int | None = None) -> list[float]:
        """The reward label's (or `label_index`'s) probability or logit for each text."""
        index = self.label_index if label_index is None else label_index
        if self.spec.score == "logit":
            return [row[index] for row in logits]
        return self.probabilities(logits)[:, index].tolist()
