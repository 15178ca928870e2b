"""Loading Hugging Face models and tokenizers from a local folder or a hub id, with errors a person can act on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers loads only with the first model: importing this module stays cheap
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why and what was tried."""


def looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def check_hub_reachable(source: str, revision: str | None = None, timeout_s: float = 5.0) -> None:
    """For a hub id that is not in the local cache: one quick request to the hub, so an unreachable hub fails in
    seconds with that reason instead of after huggingface_hub's retries (about 50 s)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str):
        return
    import httpx

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ModelLoadError(f"cannot load {source!r}: the hub at {constants.ENDPOINT} is unreachable "
                             f"({type(exc).__name__}: {exc}), and the model is not in the local cache; use a local "
                             "folder, or download it where the hub is reachable") from None


def load_pretrained(loader, source: str, *, revision: str | None = None, **kwargs):
    """`loader.from_pretrained(source)` with a clear ModelLoadError instead of a library traceback."""
    path = Path(source).expanduser()
    if looks_local(source) and not path.is_dir():
        raise ModelLoadError(f"model folder {source!r} does not exist")
    if not looks_local(source):
        check_hub_reachable(source, revision)
    try:
        return loader.from_pretrained(str(path) if looks_local(source) else source, revision=revision, **kwargs)
    except Exception as exc:  # noqa: BLE001 - corrupt weights, wrong architecture, hub errors: all one story
        offline = " (HF_HUB_OFFLINE is set, so only cached hub models load)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelLoadError(f"cannot load {source!r}{offline}: {exc}") from exc


def load_causal_lm(source: str, *, revision: str | None = None,
                   **model_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and its tokenizer, set up for left-padded batches. The tokenizer loads first, so a
    folder that is no model fails fast. `model_kwargs` go to from_pretrained (e.g. `dtype`)."""
    tokenizer = load_causal_lm_tokenizer(source, revision=revision)
    return load_causal_lm_model(source, revision=revision, **model_kwargs), tokenizer


def load_causal_lm_tokenizer(source: str, *, revision: str | None = None) -> PreTrainedTokenizerBase:
    """A causal LM's tokenizer for left-padded batches: generation continues from the right end of every row, and a
    tokenizer without a pad token pads with EOS."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, source, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm_model(source: str, *, revision: str | None = None, **model_kwargs) -> PreTrainedModel:
    """The causal LM alone, in eval mode (dropout off: sampling and scoring see the same model)."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, source, revision=revision, **model_kwargs).eval()
