"""One way to load a causal LM (shared/modeling.py), for the generator and the trainer alike."""

from __future__ import annotations

import pytest
import torch

from services.generator.checkpoints import load_policy
from services.trainer.policy import load_policy_and_tokenizer
from shared.modeling import ModelLoadError, load_causal_lm


def test_a_causal_lm_loads_ready_for_left_padded_batches(tiny_kit):
    model, tokenizer = load_causal_lm(str(tiny_kit / "tiny-gpt2"))
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == tokenizer.eos_token_id  # GPT-2 has no pad
    served = load_policy("base", str(tiny_kit / "tiny-gpt2"), "cpu")
    trained, trainer_tokenizer = load_policy_and_tokenizer(str(tiny_kit / "tiny-gpt2"))
    assert trained.dtype == torch.float32 and not trained.training
    for tok in (served.tokenizer, trainer_tokenizer):
        assert (tok.padding_side, tok.pad_token_id) == ("left", tokenizer.pad_token_id)
    ids = torch.tensor([tokenizer("I watched The").input_ids])
    with torch.no_grad():  # the same weights whichever service loaded them
        assert torch.equal(served.model(ids).logits.argmax(-1), trained(ids).logits.argmax(-1))


def test_what_is_no_model_fails_with_a_clear_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_causal_lm(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_policy_and_tokenizer(str(tmp_path / "empty"))


def test_an_unreachable_hub_fails_at_once_with_that_reason(monkeypatch):
    """A hub id not in the cache, with the hub unreachable: one quick probe says so (no minute of retries)."""
    import socket

    from huggingface_hub import constants
    from transformers import AutoConfig

    from shared.modeling import load_pretrained

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(ModelLoadError, match=r"cannot load 'nobody/no-such-model': the hub at .* is unreachable"):
        load_pretrained(AutoConfig, "nobody/no-such-model")
