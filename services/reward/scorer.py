"""The torch side of the reward service: tokenize, run a sequence classifier, turn logits into scores.

Kinds of model served (any `AutoModelForSequenceClassification` checkpoint):
- classifiers (num_labels >= 2): the reward is one label's probability or logit, the label chosen by name;
- scalar-head reward models (num_labels 1, as OpenAssistant's and OpenRLHF's): the raw value is the reward;
- encoder backbones (BERT-like, pooled first token) and causal-LM backbones (GPT-2, Llama: the last real token);
- input as the text alone, (prompt, response) as a tokenizer text pair, or through the tokenizer's chat template.

The forward pass itself is a backend's (backends.py: torch, or an ONNX export run by onnxruntime); the Scorer
tokenizes, pads and turns logits into scores.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from services.reward.backends import Backend, Batch, TorchBackend, cpu_has_fast_bf16, onnx_providers
from services.reward.calibration import Candidate, choose, synthetic_texts
from shared.modeling import ModelLoadError, load_pretrained
from shared.schemas import MAX_REWARD_MEAN, MAX_REWARD_STD, MIN_REWARD_STD, InputKind, ModelSpec, ScoreKind

log = logging.getLogger(__name__)

DEFAULT_REWARD_LABEL = "POSITIVE"
GPU_PAD_MULTIPLE = 8
# Two small padded batches of different shapes (texts, words): what an ONNX export traces and is checked on.
_PROBE_SHAPES = ((2, 6), (3, 11))


class TextTooLongError(ValueError):
    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(f"texts[{index}] has {tokens} tokens, more than the model's max_length {limit}; "
                         f"send truncate=true or shorten it")


class PromptsRequiredError(ValueError):
    """A prompt-and-response model was sent texts without their prompts."""


class Encoded(list):
    """One input's token ids (a list, so its batching cost is its length) with its token type ids, for pair input
    to a model that takes them (BERT-like: 0 for the prompt, 1 for the response)."""

    __slots__ = ("type_ids",)

    def __init__(self, ids: list[int], type_ids: list[int] | None = None):
        super().__init__(ids)
        self.type_ids = type_ids


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
    """One loaded classifier. `forward` runs in the batcher's worker thread; everything else on the event loop.

    `spec` is the resolved spec: `score` and `input` hold what is actually used (never None or `auto`)."""

    def __init__(self, spec: ModelSpec, device: str = "cpu"):
        self.device = device
        self._gpu = torch.device(device).type == "cuda"
        self.source = spec.source
        self.tokenizer = load_pretrained(AutoTokenizer, spec.source, revision=spec.revision)
        self.model, info = self._load_model(spec)
        if missing := sorted(info.get("missing_keys") or ()):
            unexpected = sorted(info.get("unexpected_keys") or ())
            hint = f" (the checkpoint has {', '.join(unexpected[:5])} instead)" if unexpected else ""
            raise ModelLoadError(
                f"{spec.source!r} has no weights for {', '.join(missing[:5])}{hint}: it is not a sequence "
                "classifier or reward model of this architecture, and a newly initialized head would score at random")
        self.model.to(device).eval()
        config = self.model.config
        self.id2label = {int(k): v for k, v in config.id2label.items()}
        self.scalar = config.num_labels == 1
        self.label_index = self._label(spec.label)
        self.label = self.id2label[self.label_index]
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.reward_mean, self.reward_std = self._normalization(spec)
        score = self._score_kind(spec)
        self.input_kind: InputKind = self._input_kind(spec.input)
        self.max_length = self._max_length(spec.max_length)
        if self.input_kind == "pair" and self.max_length <= (extra := self.tokenizer.num_special_tokens_to_add(True)):
            raise ModelLoadError(f"max_length {self.max_length} leaves no room for a text pair: the tokenizer adds "
                                 f"{extra} special tokens to each")
        self.pad_id = self._pad_id()
        forward_args = inspect.signature(self.model.forward).parameters
        self._type_ids = ("token_type_ids" in self.tokenizer.model_input_names and "token_type_ids" in forward_args)
        if getattr(config, "use_cache", None):
            config.use_cache = False  # one forward pass per batch: a KV cache would only cost memory
        self._lock = threading.Lock()  # one forward at a time even if a model is shared by two batchers
        self.backend_requested = spec.backend
        self.backend = self._backend(spec)
        self.spec = spec.model_copy(update={"score": score, "input": self.input_kind, "backend": self.backend.kind,
                                            "dtype": self.backend.dtype})
        # The backend's model (auto on a GPU may have cast a copy); none for ONNX: the graph has the weights.
        self.model = getattr(self.backend, "model", None)

    # -- load-time resolution ---------------------------------------------------------------------------------------

    def _load_model(self, spec: ModelSpec):
        """The classifier and its loading info; on a GPU with PyTorch's fused attention (sdpa) where it has one."""
        load = lambda **kw: load_pretrained(AutoModelForSequenceClassification, spec.source,  # noqa: E731
                                            revision=spec.revision, output_loading_info=True, **kw)
        if self._gpu:
            try:
                return load(attn_implementation="sdpa")
            except ModelLoadError as exc:
                log.info("%s: no sdpa attention (%s); loading with the default", spec.source, exc)
        return load()

    def _backend(self, spec: ModelSpec) -> Backend:
        """The backend of the spec, or (auto) the fastest that agrees with float32 torch on synthetic batches."""
        if spec.backend != "auto":
            return self._make_backend(spec.backend, spec.dtype, shared=False)
        cuda = self._gpu
        wanted = [("torch", "float32"), ("torch", "float16" if cuda else "bfloat16")]
        if not cuda and not cpu_has_fast_bf16():
            wanted.pop()
            log.info("%s: auto skips torch bfloat16: this CPU has neither AVX-512 BF16 nor AMX", self.source)
        if not cuda or "CUDAExecutionProvider" in onnx_providers(self.device):
            wanted += [("onnx", "float32")] + ([] if cuda else [("onnx", "int8")])  # int8 matmuls: CPU kernels
        candidates = [Candidate(k, d, lambda k=k, d=d: self._make_backend(k, d)) for k, d in wanted]
        batches = [self.pad(self.tokenize(texts, True, self._no_prompts(texts)))
                   for texts in synthetic_texts(self._vocabulary())]
        return choose(candidates, batches, self.probabilities, self.label_index, self.source)

    def _make_backend(self, kind: str, dtype: str, shared: bool = True) -> Backend:
        """`shared`: the torch model must stay as it is for other candidates (auto)."""
        if kind == "torch":
            return TorchBackend(self.model, self.device, dtype, shared=shared)
        from services.reward.onnx_cache import load_onnx  # onnxruntime only when asked for

        probes = [self.pad(self.tokenize(texts, True, self._no_prompts(texts)))
                  for texts in synthetic_texts(self._vocabulary(), _PROBE_SHAPES, seed=1)]
        return load_onnx(self.model, dtype, self.device, self.source, probes, self._type_ids, self.max_length)

    def _vocabulary(self) -> list[str]:
        """Whole-word tokens of the tokenizer (BPE's word-start marks dropped), to make synthetic texts from."""
        words = {w.lstrip("Ġ▁") for w in self.tokenizer.get_vocab()}
        return sorted(w for w in words if w.isalpha()) or ["text"]

    def _no_prompts(self, texts: list[str]) -> list[str] | None:
        """Empty prompts for a pair or chat model (the whole text is the response); None for a text model."""
        return None if self.input_kind == "text" else [""] * len(texts)

    def _label(self, wanted: str | None) -> int:
        if not self.scalar:
            return resolve_label(self.id2label, wanted)
        only = self.id2label[0]
        if wanted is not None and wanted.lower() != only.lower():
            raise ModelLoadError(f"label {wanted!r} has no meaning for a scalar-head reward model (num_labels 1): "
                                 f"its one output, {only!r}, is the reward; leave label out")
        return 0

    def _score_kind(self, spec: ModelSpec) -> ScoreKind:
        """Explicit `score` wins; unset means prob for a classifier, logit for a scalar head or a normalized model."""
        if spec.score == "prob" and self.scalar:
            raise ModelLoadError(
                "score: prob is meaningless for a scalar-head reward model (num_labels 1): a softmax over one logit is "
                "1.0 for every text. Its raw value is the reward: use score: logit, or leave score out")
        if spec.score is not None:
            return spec.score
        return "logit" if self.scalar or spec.normalize else "prob"

    def _normalization(self, spec: ModelSpec) -> tuple[float | None, float | None]:
        """(mean, std) for `normalize`, the spec's values first, then config.json's `mean` / `std` (OpenRLHF)."""
        if not spec.normalize:
            return None, None
        config = self.model.config
        mean = spec.reward_mean if spec.reward_mean is not None else getattr(config, "mean", None)
        std = spec.reward_std if spec.reward_std is not None else getattr(config, "std", None)
        if mean is None or std is None:
            raise ModelLoadError("normalize needs a mean and a std: set reward_mean and reward_std, or use a model "
                                 "whose config.json has `mean` and `std` (as OpenRLHF saves them)")
        try:
            mean, std = float(mean), float(std)
        except (TypeError, ValueError):
            raise ModelLoadError(f"the model's config.json has a mean / std that is not a number: {mean!r}, "
                                 f"{std!r}") from None
        if not (abs(mean) <= MAX_REWARD_MEAN and MIN_REWARD_STD <= std <= MAX_REWARD_STD):
            raise ModelLoadError(f"normalization needs |mean| <= {MAX_REWARD_MEAN:g} and a std in "
                                 f"[{MIN_REWARD_STD:g}, {MAX_REWARD_STD:g}], got mean {mean}, std {std}")
        return mean, std

    def _input_kind(self, wanted: str) -> InputKind:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if wanted == "auto":
            return "chat" if has_template else "text"
        if wanted == "chat" and not has_template:
            raise ModelLoadError("input: chat needs a tokenizer with a chat template, and this one has none; use "
                                 "input: pair or text")
        return wanted  # type: ignore[return-value]

    def _pad_id(self) -> int:
        """The id to pad batches with, made consistent between the model's config and the tokenizer.

        A causal-LM classifier (GPT-2, Llama) reads the rightmost token that is not `config.pad_token_id`, so
        batches must be padded with exactly that id, and it must be set at all (else transformers refuses batches
        of more than one). Priority: the config's pad id (what the model itself detects), the tokenizer's, its EOS
        (the usual choice for GPT-2-like tokenizers without a pad token), then 0."""
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        tok = self.tokenizer
        candidates = [(text_config.pad_token_id, "config"), (tok.pad_token_id, "tokenizer"),
                      (tok.eos_token_id, "eos"), (0, "fallback")]
        pad, origin = next((int(i), o) for i, o in candidates if isinstance(i, int))
        if tok.pad_token_id is not None and tok.pad_token_id != pad:
            log.warning("%s: the tokenizer pads with %d but the model's config says %d; padding with the config's, "
                        "which is what the model detects", self.source, tok.pad_token_id, pad)
        if tok.pad_token_id is None:
            with contextlib.suppress(Exception):  # a tokenizer that refuses it still gets padded batches below
                tok.pad_token = tok.convert_ids_to_tokens(pad)
        if origin != "config":
            log.info("%s: no pad token in the model's config; padding with id %d (%s)", self.source, pad, origin)
        text_config.pad_token_id = pad
        config.pad_token_id = pad
        return pad

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

    # -- requests ---------------------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str], truncate: bool, prompts: list[str] | None = None) -> list[list[int]]:
        """Token ids with special tokens; longer than max_length -> cut (truncate) or TextTooLongError.

        `prompts` (one per text, each a prefix of its text) matter only to pair and chat models, which score
        (prompt, text[len(prompt):]) and raise PromptsRequiredError without them."""
        cut = {"truncation": True, "max_length": self.max_length} if truncate else {"truncation": False}
        if self.input_kind == "text":
            enc = self.tokenizer(texts, **cut)
        else:
            if prompts is None:
                raise PromptsRequiredError(
                    f"this model scores a prompt and a response (input: {self.input_kind}): send `prompts`, one per "
                    "text, each the start of its text")
            if len(prompts) != len(texts) or any(not t.startswith(p) for p, t in zip(prompts, texts)):
                raise PromptsRequiredError("prompts must be one per text, each a prefix of its text")
            responses = [t[len(p):] for p, t in zip(prompts, texts)]
            if self.input_kind == "pair":
                enc = self.tokenizer(prompts, responses, **cut)
            else:
                chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                         for p, r in zip(prompts, responses)]
                rendered = self.tokenizer.apply_chat_template(chats, tokenize=False)
                # The template writes its own special tokens (BOS and the like), as apply_chat_template(tokenize=True)
                # does: adding them again would double them.
                enc = self.tokenizer(rendered, add_special_tokens=False, **cut)
        ids = enc["input_ids"]
        for i, seq in enumerate(ids):  # with truncate, never: transformers cuts each pair to fit
            if len(seq) > self.max_length:
                raise TextTooLongError(i, len(seq), self.max_length)
        if self.input_kind == "pair" and self._type_ids and "token_type_ids" in enc:
            return [Encoded(seq, types) for seq, types in zip(ids, enc["token_type_ids"])]
        return ids

    def forward(self, batch: list[list[int]]) -> list[list[float]]:
        """Logits for each sequence, (B, num_labels), as float lists, from the backend."""
        padded = self.pad(batch)
        with self._lock:
            return self.backend.run(*padded).tolist()  # (B, num_labels)

    def pad(self, batch: list[list[int]]) -> Batch:
        """Right padding with an attention mask, padded with the model's own pad id, so a causal-LM classifier finds
        each row's last real token. On a GPU the width is rounded up to a multiple of GPU_PAD_MULTIPLE (at most
        max_length): every new (B, T) shape costs a GPU float16 forward a one-off ~8 ms, and fewer widths mean
        fewer new shapes (and tensor-core-friendly ones)."""
        width = max(map(len, batch))
        if self._gpu:
            width = min(-(-width // GPU_PAD_MULTIPLE) * GPU_PAD_MULTIPLE, max(width, self.max_length))
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        typed = any(getattr(seq, "type_ids", None) is not None for seq in batch)
        types = torch.zeros((len(batch), width), dtype=torch.long) if typed else None  # (B, T)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
            if types is not None and getattr(seq, "type_ids", None) is not None:
                types[row, : len(seq)] = torch.tensor(seq.type_ids, dtype=torch.long)
        return Batch(ids, mask, types)

    def probabilities(self, logits: list[list[float]] | torch.Tensor) -> torch.Tensor:
        """(N, num_labels): softmax over labels, or independent sigmoids for a multi-label model and for a scalar
        head (as transformers' text-classification pipeline does: a softmax over one logit is always 1)."""
        x = torch.as_tensor(logits, dtype=torch.float32)
        return x.sigmoid() if self.multi_label or self.scalar else x.softmax(-1)

    def scores(self, logits: list[list[float]], label_index: int | None = None) -> list[float]:
        """The reward label's (or `label_index`'s) probability or logit for each text, normalized when configured."""
        index = self.label_index if label_index is None else label_index
        if self.spec.score == "logit":
            values = [row[index] for row in logits]
        else:
            values = self.probabilities(logits)[:, index].tolist()
        if self.reward_mean is not None:
            values = [(v - self.reward_mean) / self.reward_std for v in values]
        return values
