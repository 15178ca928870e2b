"""Builders shared by the reliability tests: service settings on the tiny kit and a real checkpoint folder."""

from __future__ import annotations

import shutil
from pathlib import Path

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
