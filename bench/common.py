"""Helpers shared by the benchmark scripts: logging, rounding, strict JSON, machine and code facts, the cached models.

bench/reward.py and bench/generator.py predate this module and keep their own copies of some of these; keep the
two in step where they overlap (the GPT-2-small-size model above all: bench/generator.py builds the same folder).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_GPT2_DIR = REPO / ".cache" / "bench" / "gpt2-small"  # also built (identically) by bench/generator.py


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rounded(x: float, digits: int = 2) -> float:
    return round(x, digits) if math.isfinite(x) else x


def without_nan(x):
    """NaN (a measurement with no samples) as null, so the output is strict JSON."""
    if isinstance(x, dict):
        return {k: without_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [without_nan(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> dict:
    """The commit measured and the tracked files changed since, so a number can be tied to the code behind it."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "changed": git("diff", "--name-only", "HEAD").splitlines()}


def tiny_dir(arg: str | None, needed: tuple[str, ...]) -> Path:
    """The tiny kit (built, about 2 minutes, if any of the `needed` paths inside it is missing)."""
    root = Path(arg or os.environ.get("RLHF_TINY_DIR") or REPO / ".cache" / "tiny")
    if not all((root / rel).exists() for rel in needed):
        from shared.tiny.build import build_tiny

        log(f"building the tiny kit in {root} (about 2 minutes)")
        build_tiny(root)
    return root


def small_gpt2(tokenizer_dir: Path, out: Path = SMALL_GPT2_DIR) -> Path:
    """A GPT-2-small-size causal LM (12 layers, 12 heads, dim 768, 1024 positions) with random weights, built once.

    Random weights are enough: speed does not depend on the values. It uses the tiny tokenizer (vocabulary 1024),
    so prompts have the same token counts for both sizes and only the model's size differs. Built in a scratch
    folder and renamed into place, so an interrupted build is never taken for a finished one. The same recipe as
    bench/generator.py's `small_model`, so the two share the cached folder.
    """
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    log(f"building the GPT-2-small-size model in {out}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=len(tok),
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(scratch)
        tok.save_pretrained(scratch)
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out
