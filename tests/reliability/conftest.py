"""Builders shared by the reliability tests: service settings on the tiny kit and a real checkpoint folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from services.generator.settings import GeneratorSettings
from services.reward.settings import RewardSettings
from shared.checkpoints import write_checkpoint

ADMIN_KEY = "admin-secret"
CHECKPOINT = "run/step-1"


def reward_settings(kit: Path, **kw) -> RewardSettings:
    """The tiny sentiment classifier as `sentiment` (the default); PUT /v1/models may load only from the kit."""
    kw.setdefault("models", [{"name": "sentiment", "source": str(kit / "tiny-sentiment"), "label": "POSITIVE"}])
    kw.setdefault("model_dirs", [kit])
    kw.setdefault("max_models", 3)
    return RewardSettings(port=0, device="cpu", torch_threads=1, **kw)


def generator_settings(kit: Path, checkpoints: Path | None, **kw) -> GeneratorSettings:
    return GeneratorSettings(model=str(kit / "tiny-gpt2"), checkpoints=checkpoints, port=0, device="cpu",
                             torch_threads=1, **kw)


def make_checkpoint_root(kit: Path, root: Path) -> Path:
    """`<root>/run/step-1/`: the tiny policy copied as is, with its manifest, as the trainer would commit it."""

    def save(tmp: Path) -> None:
        shutil.copytree(kit / "tiny-gpt2", tmp, dirs_exist_ok=True)

    write_checkpoint(root, "run", 1, save, metrics={"eval/reward_mean": 0.5})
    return root


def watch_readyz(url: str, seconds: float = 10) -> list[httpx.Response]:
    """Poll /readyz until it has been 503 and is 200 again (or time runs out); every answer, in order."""
    seen: list[httpx.Response] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (seen and seen[-1].status_code == 200
                                               and any(r.status_code == 503 for r in seen)):
        seen.append(httpx.get(url + "/readyz"))
        time.sleep(0.02)
    return seen
