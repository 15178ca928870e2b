"""PPO under bf16 autocast on the tiny policy: forward passes in bf16, everything that trains or is learned from in
float32, finite losses; and a whole `train()` run that records the precision it ran in."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from services.trainer.config import load_config
from services.trainer.report import MIXED_PRECISION_KEY
from services.trainer.run import train
from tests.conftest import ROOT
from tests.integration.test_ppo_loop import PROMPTS, length_reward, make_trainer

pytestmark = pytest.mark.slow


def matmul_output_dtypes(trainer) -> tuple[list[torch.dtype], object]:
    """The output dtypes of the first block's attention projection, appended at each forward pass."""
    seen: list[torch.dtype] = []
    layer = trainer.policy.base.transformer.h[0].attn.c_attn
    return seen, layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))


def test_bf16_iterations_train_float32_weights_with_finite_losses(tiny_kit):
    trainer = make_trainer(tiny_kit, **{"train.mixed_precision": "bf16"})
    assert trainer.precision == "bf16" and trainer.accelerator.mixed_precision == "bf16"
    seen, hook = matmul_output_dtypes(trainer)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    try:
        stats = [trainer.step() for _ in range(2)]
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # generation, rollout forward and updates all ran under autocast
    for s in stats:
        bad = {k: v for k, v in s.items() if not math.isfinite(v)}
        assert not bad
    assert stats[0]["objective/kl"] == 0.0  # policy and reference see the same bf16 casts of the same weights
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}  # master weights
    state = trainer.optimizer.state_dict()["state"]
    assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))  # and they moved


def test_rollout_numbers_are_float32_under_bf16(tiny_kit):
    trainer = make_trainer(tiny_kit, **{"train.mixed_precision": "bf16"})
    rollouts = trainer.generate(PROMPTS[:4])
    logprobs, values, entropy, ref_logprobs = trainer.policy_forward(rollouts)
    assert {t.dtype for t in (logprobs, values, entropy, ref_logprobs)} == {torch.float32}
    assert torch.isfinite(logprobs).all() and (logprobs <= 0).all()


def test_trainers_of_different_precisions_in_one_process(tiny_kit):
    """Accelerate keeps one precision per process; building trainers in turn (as tests and benchmarks do) must give
    each its own."""
    for wanted, dtype in (("bf16", torch.bfloat16), ("no", torch.float32), ("bf16", torch.bfloat16)):
        trainer = make_trainer(tiny_kit, **{"train.mixed_precision": wanted})
        seen, hook = matmul_output_dtypes(trainer)
        try:
            trainer.generate(PROMPTS[:2])
        finally:
            hook.remove()
        assert trainer.accelerator.mixed_precision == wanted and set(seen) == {dtype}


def test_a_bf16_run_says_and_records_its_precision(tiny_kit, tmp_path, caplog):
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={tmp_path}", "train.total_steps=2",
        "train.tensorboard=false", "method.num_rollouts=16", "method.chunk_size=16", "train.batch_size=8",
        "method.ppo_epochs=1", "method.gen_kwargs.max_new_tokens=8", "train.mixed_precision=bf16"])
    with caplog.at_level(logging.INFO, logger="services.trainer.run"):
        status = train(config, reward_fn=length_reward, prompts=PROMPTS, eval_prompts=PROMPTS[:2])
    assert status.state == "finished"
    assert "mixed precision: bf16 (train.mixed_precision bf16)" in caplog.text
    manifest = json.loads((config.run_dir / "step-2" / "manifest.json").read_text())
    assert manifest["metrics"][MIXED_PRECISION_KEY] == "bf16"
    assert manifest["config"]["train"]["mixed_precision"] == "bf16"


def test_bf16_keeps_the_output_layer_float32_and_checkpoints_unchanged(tiny_kit):
    """The logits that log-probs come from are computed in float32 under bf16 autocast, for the policy and the
    reference alike; the head keeps its weights, its tie to the embeddings and its state_dict keys."""
    plain = make_trainer(tiny_kit, **{"train.mixed_precision": "no"})
    trainer = make_trainer(tiny_kit, **{"train.mixed_precision": "bf16"})
    base = trainer.policy.base
    head = base.get_output_embeddings()
    assert head.weight is base.get_input_embeddings().weight  # still tied
    assert list(base.state_dict()) == list(plain.policy.base.state_dict())
    seen: list[torch.dtype] = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.dtype))
             for m in (base, trainer.reference.model)]
    try:
        trainer.policy_forward(trainer.generate(PROMPTS[:4]))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {torch.float32}
    assert plain.policy.base.get_output_embeddings().__class__ is torch.nn.Linear  # float32 runs are untouched
