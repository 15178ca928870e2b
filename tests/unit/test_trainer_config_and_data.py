"""Trainer configuration (presets, overrides, validation) and prompt data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.trainer.config import AdamKwargs, CosineAnnealingKwargs, load_config
from services.trainer.data import DataError, PromptSampler, first_words, load_texts, make_prompts

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["tiny.yaml", "ppo_sentiments.yaml", "tiny-negative.yaml", "tiny-3label.yaml",
                                    "finbert_news.yaml"])
def test_presets_validate(preset):
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.method.num_rollouts % cfg.train.batch_size == 0


def test_real_preset_carries_trlx_defaults():
    cfg = load_config(ROOT / "configs" / "ppo_sentiments.yaml")
    m = cfg.method
    assert cfg.model.model_path == "lvwerra/gpt2-imdb" and cfg.data.source == "imdb"
    assert (m.num_rollouts, m.chunk_size, m.ppo_epochs, m.init_kl_coef, m.target, m.horizon) == \
        (128, 128, 4, 0.001, None, 10000)
    assert (m.gamma, m.lam, m.cliprange, m.cliprange_value, m.vf_coef, m.cliprange_reward) == \
        (1.0, 0.95, 0.2, 0.2, 1.0, 10)
    assert cfg.optimizer.kwargs == AdamKwargs(lr=3.0e-5, betas=(0.9, 0.95), eps=1.0e-8, weight_decay=1.0e-6)
    assert cfg.scheduler.kwargs == CosineAnnealingKwargs(T_max=10**12, eta_min=3.0e-5)
    assert (m.gen_kwargs.max_new_tokens, m.gen_kwargs.top_k, m.gen_kwargs.top_p, m.gen_kwargs.do_sample) == \
        (40, 0, 1.0, True)


def test_overrides_and_environment(monkeypatch):
    monkeypatch.setenv("RLHF_TINY_DIR", "/kits/tiny")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "reward.url=http://reward:8000", "reward.model=three", "train.checkpoint_dir=/ckpt", "train.total_steps=7",
        "train.seed=3", "optimizer.kwargs.lr=1e-4", "data.prompt_words=[2, 4]"])
    assert cfg.model.model_path == "/kits/tiny/tiny-gpt2"
    assert (cfg.reward.url, cfg.reward.model, str(cfg.train.checkpoint_dir)) == ("http://reward:8000", "three", "/ckpt")
    assert (cfg.train.total_steps, cfg.train.seed, cfg.data.prompt_words) == (7, 3, (2, 4))
    assert cfg.optimizer.kwargs.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("override, message", [
    (["method.num_rollouts=60"], "multiple of"),
    (["train.total_steps=0"], "greater than or equal to 1"),
    (["train.bogus=1"], "Extra inputs"),
    (["method.cliprange=-1"], "greater than 0"),
    (["data.prompt_words=[5, 3]"], "prompt_words"),
    (["train.run_name=../escape"], "pattern"),
])
def test_bad_configs_fail_at_start_with_a_clear_message(override, message):
    with pytest.raises(ValidationError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", override)


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="key=value"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.total_steps"])


def test_prompts_are_the_first_three_to_five_words():
    texts = [f"word{i} " * 12 + "<br /><br />end" for i in range(200)]
    prompts = make_prompts(texts, (3, 5), seed=0)
    lengths = {len(p.split()) for p in prompts}
    assert lengths == {3, 4, 5}
    assert make_prompts(texts, (3, 5), seed=0) == prompts
    assert first_words("A <br />B C", 3) == "A B C"


def test_sampler_is_seeded_endless_and_resumable():
    prompts = [f"p{i}" for i in range(10)]
    a = PromptSampler(prompts, seed=1)
    first = a.take(7)
    state = a.state_dict()
    rest = a.take(8)  # crosses into a second, reshuffled epoch
    b = PromptSampler(prompts, seed=1)
    b.load_state_dict(state)
    assert b.take(8) == rest
    assert sorted(first + rest[:3]) == sorted(prompts)


def test_local_files_folders_and_columns(tmp_path):
    rows = [{"review": f"text number {i} is here", "label": i % 2} for i in range(30)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = load_texts(str(tmp_path / "data.jsonl"), column="review")
    assert len(train) == 27 and len(held) == 3
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "train.csv").write_text("review,label\n" + "".join(f"train row {i},1\n" for i in range(5)))
    (folder / "test.csv").write_text("review,label\n" + "".join(f"test row {i},0\n" for i in range(2)))
    train, held = load_texts(str(folder), column="review")
    assert len(train) == 5 and len(held) == 2 and held[0].startswith("test")
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    train, held = load_texts(str(tmp_path / "data.parquet"), column="review")
    assert len(train) == 27 and train[0] == "text number 0 is here"
    with pytest.raises(DataError, match="no column 'text'"):
        load_texts(str(tmp_path / "data.jsonl"))
    with pytest.raises(DataError, match="not imdb, tiny"):
        load_texts(str(tmp_path / "missing.csv"))


def test_tiny_preset_builds_the_kit_only_when_missing(tmp_path, monkeypatch):
    from services.trainer import cli

    kit = tmp_path / "kit"
    monkeypatch.setenv("RLHF_TINY_DIR", str(kit))
    built = []
    monkeypatch.setattr("shared.tiny.build.build_tiny", lambda out, **kw: built.append(out))
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cli._ensure_tiny_kit(cfg)
    assert built == [kit]
    kit.mkdir()
    (kit / "report.json").write_text("{}")
    cli._ensure_tiny_kit(cfg)
    assert built == [kit]  # present: reused, not rebuilt


def test_hub_datasets_by_id(monkeypatch):
    import datasets

    asked = []

    def fake_load(name):
        asked.append(name)
        rows = [{"text": f"Stocks rallied on day {i} as markets rose"} for i in range(10)]
        return {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:3])}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, held = load_texts("hf:fancyzhx/ag_news")
    assert asked == ["fancyzhx/ag_news"] and len(train) == 10 and len(held) == 3
    cfg = load_config(ROOT / "configs" / "finbert_news.yaml")
    assert cfg.reward.label == "positive" and cfg.data.source == "hf:fancyzhx/ag_news"
