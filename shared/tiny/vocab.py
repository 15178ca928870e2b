"""Tokenizers trained on the tiny corpus, saved in Hugging Face format.

The policy gets a byte-level BPE (as GPT-2 has) and the classifier a lower-cased WordPiece (as DistilBERT has), so
the reward service sees only text, exactly as with the real models whose vocabularies differ.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style tokenizer: byte-level BPE, one special token that is BOS, EOS and padding at once."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=max_length, padding_side="left",
    )


def wordpiece_vocab(texts: Iterable[str], vocab_size: int, specials: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary built in plain Python, so it is the same in every process: the special tokens, every
    character alone and as a `##` continuation (so any word can be spelled), then whole words by frequency
    (ties by spelling). The `tokenizers` trainer orders tied entries by hash, which differs between runs."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    # Every plain ASCII letter, digit and punctuation mark too, so text from outside the corpus still tokenizes.
    chars = sorted({c for word in counts for c in word} | set(string.ascii_lowercase + string.digits +
                                                              string.punctuation))
    tokens = specials + chars + [f"##{c}" for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    tokens += words[: max(0, vocab_size - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A DistilBERT-style tokenizer: lower-cased WordPiece with [CLS] text [SEP]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(wordpiece_vocab(texts, vocab_size, specials), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length, padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
