"""The trainer's CarperAI/trlx semantics, pinned on the tiny kit (and a 4-layer GPT-2 built here): the hydra
reference, which parameters `num_layers_unfrozen` trains, gradient clipping, the reward preprocessing order,
`gen_experience_kwargs`, half-precision checkpoints, scheduler and KL-controller cadence, and fractional intervals.

Each test names the trlX behaviour it pins; expected values are computed here, independently of the trainer."""

from __future__ import annotations

import math
import shutil
import statistics
from fractions import Fraction

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from services.trainer.config import MethodConfig, TrainerConfig, load_config, reaches_multiple
from services.trainer.data import PromptSampler
from services.trainer.loop import PPOTrainer, Rollouts
from services.trainer.policy import (
    FullReference,
    HydraReference,
    PolicyWithValueHead,
    freeze_trunk,
    load_policy_and_tokenizer,
    make_reference,
    response_logprobs,
)
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# Prompts of different token lengths, so that every batch of them is left-padded.
PROMPTS = ["I watched The", "The story follows a", "This comedy", "We went to see The", "I saw The Quiet",
           "The film The Golden", "In The Silent Mirror,", "My review of"]


def length_reward(samples, prompts, outputs, **kw):
    return [min(len(o), 40) / 40 for o in outputs]


def build(model_path, *sets: str, reward_fn=length_reward) -> tuple[PPOTrainer, FullReference]:
    """A trainer on `model_path` as test_ppo_loop.make_trainer builds one (16 rollouts, minibatches of 8, 2 epochs:
    4 optimizer steps an iteration), and a full frozen copy of the initial model taken before anything trains."""
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={model_path}", "method.num_rollouts=16", "method.chunk_size=8", "train.batch_size=8",
        "method.ppo_epochs=2", "method.gen_kwargs.max_new_tokens=12", *sets])
    torch.manual_seed(config.train.seed)
    base, tokenizer = load_policy_and_tokenizer(config.model.model_path)
    initial = FullReference(base)
    reference = make_reference(base, config.model.num_layers_unfrozen)  # before freeze_trunk, from the same base
    freeze_trunk(base, config.model.num_layers_unfrozen)
    policy = PolicyWithValueHead(base)
    trainer = PPOTrainer(config, policy, reference, tokenizer, reward_fn, PromptSampler(PROMPTS, config.train.seed),
                         PROMPTS[:4])
    return trainer, initial


# Exact comparisons with a float32 copy of the model need float32 forward passes.
FLOAT32 = "train.mixed_precision=no"


def tiny_gpt2(tiny_kit):
    return tiny_kit / "tiny-gpt2"


def copy_tokenizer(tiny_kit, folder) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_gpt2(tiny_kit) / name, folder / name)


@pytest.fixture(scope="module")
def gpt2_4_layers(tiny_kit, tmp_path_factory):
    """A randomly initialised 4-layer GPT-2 (dim 64) on the tiny kit's tokenizer, saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("gpt2-4-layers")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2(tiny_kit))
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=4, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    copy_tokenizer(tiny_kit, folder)
    return folder


# -- 1. the hydra reference --------------------------------------------------------------------------------------------


def reference_gap(trainer: PPOTrainer, initial: FullReference, rollouts: Rollouts) -> tuple[float, float, float]:
    """On `rollouts`: (max |ref_logprobs - initial copy's log-probs|, max |hydra logits - initial copy's logits| on
    every attended position, max |policy log-probs - ref_logprobs|), response mask applied to the log-probs."""
    logprobs, _, _, ref_logprobs = trainer.policy_forward(rollouts)
    seq, att, mask = rollouts.sequences, rollouts.attention_mask, rollouts.mask
    q = rollouts.queries.shape[1]
    with torch.no_grad():
        full_logits = initial.logits(seq, att)
        expected = response_logprobs(full_logits, seq, q)
        _, _, hidden = trainer.policy(seq, att)
        ref_logits = trainer.reference.logits(seq, att, hidden)
    lp_gap = ((ref_logprobs - expected) * mask).abs().max().item()
    logit_gap = (ref_logits - full_logits)[att.bool()].abs().max().item()
    moved = ((logprobs - ref_logprobs) * mask).abs().max().item()
    return lp_gap, logit_gap, moved


def left_padded(rollouts: Rollouts) -> bool:
    pads = (rollouts.query_mask == 0).sum(1)
    return bool(pads.max() > 0) and len(set(pads.tolist())) > 1


def check_hydra_tracks_initial_copy(trainer: PPOTrainer, initial: FullReference, iterations: int) -> None:
    assert type(trainer.reference) is HydraReference
    before = trainer.generate(PROMPTS)
    assert left_padded(before)
    lp_gap, logit_gap, moved = reference_gap(trainer, initial, before)
    assert lp_gap <= 1e-5 and logit_gap <= 1e-4
    assert moved <= 1e-5  # untrained: the policy is its own reference

    for _ in range(iterations):
        stats = trainer.step()
        assert math.isfinite(stats["objective/kl"])

    for rollouts in (before, trainer.generate(PROMPTS)):  # the initial rollouts, and fresh ones from the moved policy
        assert left_padded(rollouts)
        lp_gap, logit_gap, moved = reference_gap(trainer, initial, rollouts)
        assert moved > 1e-3  # the trainable top blocks moved: the policy is no longer its reference ...
        assert lp_gap <= 1e-5  # ... but the hydra reference is still the initial model
        assert logit_gap <= 1e-4


@pytest.mark.parametrize("unfrozen", [1, 2])
def test_hydra_reference_is_the_initial_model_on_the_tiny_kit(tiny_kit, unfrozen):
    """trlX's hydra head (`num_layers_unfrozen` = N > 0): a frozen copy of the top N blocks run on the frozen trunk's
    hidden state gives the initial model's log-probs, on left-padded batches, before and after PPO iterations
    (N = 2: every block of the 2-layer kit trains, the hydra head starts from the embeddings)."""
    trainer, initial = build(tiny_gpt2(tiny_kit), f"model.num_layers_unfrozen={unfrozen}", "optimizer.kwargs.lr=1e-3",
                             FLOAT32)
    check_hydra_tracks_initial_copy(trainer, initial, iterations=2)


def test_hydra_reference_is_the_initial_model_on_a_4_layer_gpt2(gpt2_4_layers):
    """As above on a 4-layer GPT-2 with the top 2 blocks trained: the head continues from hidden_states[2]."""
    trainer, initial = build(gpt2_4_layers, "model.num_layers_unfrozen=2", "optimizer.kwargs.lr=1e-3", FLOAT32)
    assert trainer.reference.trunk_index == 2
    check_hydra_tracks_initial_copy(trainer, initial, iterations=3)


def test_make_reference_kinds(tiny_kit, gpt2_4_layers):
    """trlX builds a hydra head for N > 0 and a separate full reference model otherwise (N = -1, and 0 here)."""
    for path, layers in ((tiny_gpt2(tiny_kit), (1, 2, 3)), (gpt2_4_layers, (1, 2, 3, 4))):  # 3 > 2 blocks: all
        base, _ = load_policy_and_tokenizer(str(path))
        for n in layers:
            assert type(make_reference(base, n)) is HydraReference, (path, n)
        for n in (-1, 0):
            assert type(make_reference(base, n)) is FullReference, (path, n)


# -- 2. which parameters train -----------------------------------------------------------------------------------------


def named_snapshot(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}


def optimizer_param_ids(trainer: PPOTrainer) -> set[int]:
    return {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}


def test_num_layers_unfrozen_1_trains_only_the_top_block_final_norm_and_value_head(tiny_kit):
    """N = 1: the embeddings (token, position; the LM head is tied to the token embeddings) and block 0 stay
    bit-identical; block 1, ln_f and the value head train; the optimizer holds only the trainable parameters."""
    trainer, _ = build(tiny_gpt2(tiny_kit), "model.num_layers_unfrozen=1")
    base = trainer.policy.base
    assert base.lm_head.weight is base.transformer.wte.weight  # tied: freezing wte freezes the head
    trainable_prefixes = ("base.transformer.h.1.", "base.transformer.ln_f.", "value_head.")
    named = dict(trainer.policy.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {n for n in named if n.startswith(trainable_prefixes)}
    assert optimizer_param_ids(trainer) == {id(named[n]) for n in trainable}

    start = named_snapshot(trainer)
    for _ in range(2):
        trainer.step()
    end = named_snapshot(trainer)
    for name in start:
        if name.startswith(("base.transformer.wte.", "base.transformer.wpe.", "base.transformer.h.0.")):
            assert torch.equal(start[name], end[name]), f"{name} is frozen but changed"
        else:
            assert name.startswith(trainable_prefixes), name
            assert not torch.equal(start[name], end[name]), f"{name} trains but did not change"
    assert torch.equal(base.lm_head.weight, start["base.transformer.wte.weight"])


def test_num_layers_unfrozen_minus_1_trains_everything(tiny_kit):
    """N = -1 (trlX's default): every parameter trains, the embeddings included."""
    trainer, _ = build(tiny_gpt2(tiny_kit), "model.num_layers_unfrozen=-1")
    named = dict(trainer.policy.named_parameters())
    assert all(p.requires_grad for p in named.values())
    assert optimizer_param_ids(trainer) == {id(p) for p in named.values()}
    start = named_snapshot(trainer)
    for _ in range(2):
        trainer.step()
    end = named_snapshot(trainer)
    changed = {n for n in start if not torch.equal(start[n], end[n])}
    assert {"base.transformer.wte.weight", "base.transformer.wpe.weight"} <= changed
    assert any(n.startswith("base.transformer.h.0.") for n in changed)
    assert changed == set(start)


# -- 3. gradient clipping ----------------------------------------------------------------------------------------------


def spy_clipping(trainer: PPOTrainer, monkeypatch) -> tuple[list, list, list]:
    """Records the max_norm of each accelerator.clip_grad_norm_ call, of each torch clip_grad_norm_ call, and the
    gradient norm of the trainable parameters at each optimizer step."""
    via_accelerator, via_torch, norms = [], [], []
    accelerator_clip, torch_clip, optimizer_step = (trainer.accelerator.clip_grad_norm_,
                                                     torch.nn.utils.clip_grad_norm_, trainer.optimizer.step)

    def spy_accelerator(parameters, max_norm, *args, **kwargs):
        via_accelerator.append(max_norm)
        return accelerator_clip(parameters, max_norm, *args, **kwargs)

    def spy_torch(parameters, max_norm, *args, **kwargs):
        via_torch.append(max_norm)
        return torch_clip(parameters, max_norm, *args, **kwargs)

    def spy_step(*args, **kwargs):
        grads = [p.grad for p in trainer.policy.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return optimizer_step(*args, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", spy_accelerator)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_torch)
    monkeypatch.setattr(trainer.optimizer, "step", spy_step)
    return via_accelerator, via_torch, norms


def test_no_gradient_clipping_by_default(tiny_kit, monkeypatch):
    """trlX's `max_grad_norm` defaults to None: gradients are never clipped, and no grad-norm stat is logged. (The
    schema's default is checked; the run sets null explicitly, since the tiny preset opts into clipping.)"""
    assert MethodConfig().max_grad_norm is None
    trainer, _ = build(tiny_gpt2(tiny_kit), "method.max_grad_norm=null")
    assert trainer.config.method.max_grad_norm is None
    via_accelerator, via_torch, norms = spy_clipping(trainer, monkeypatch)
    stats = trainer.step()
    assert via_accelerator == [] and via_torch == []
    assert "ppo/grad_norm" not in stats
    assert len(norms) == trainer.config.optimizer_steps_per_iteration == 4


def test_max_grad_norm_clips_every_optimizer_step(tiny_kit, monkeypatch):
    """With `max_grad_norm` set, every optimizer step's gradient is clipped to it (through the accelerator)."""
    trainer, _ = build(tiny_gpt2(tiny_kit), "method.max_grad_norm=0.5")
    via_accelerator, _, norms = spy_clipping(trainer, monkeypatch)
    stats = trainer.step()
    assert via_accelerator == [0.5] * 4
    assert len(norms) == 4 and max(norms) <= 0.5 + 1e-4
    assert "ppo/grad_norm" in stats and stats["ppo/grad_norm"] > 0


# -- 4. reward preprocessing -------------------------------------------------------------------------------------------


def scorer(tiny_kit, *sets: str) -> PPOTrainer:
    return build(tiny_gpt2(tiny_kit), *sets)[0]


def clip(xs: list[float], bound: float) -> list[float]:
    return [min(max(x, -bound), bound) for x in xs]


def close(actual: torch.Tensor, expected: list[float]) -> bool:
    return actual.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)


BATCH_1 = [-50.0, -5.0, 0.0, 5.0, 50.0, 20.0]  # clipped to 10: [-10, -5, 0, 5, 10, 10]
BATCH_2 = [30.0, 1.0, -2.0, 4.0]  # clipped: [10, 1, -2, 4]


def test_scores_are_clipped_before_the_reference_std_is_taken(tiny_kit):
    """trlX: clip to +-cliprange_reward, then take the first batch's std (of the clipped scores) as the reference and
    divide by it (`scale_reward: ref`), for every later batch too."""
    trainer = scorer(tiny_kit, "method.cliprange_reward=10", "method.scale_reward=ref")
    ref_std = statistics.stdev(clip(BATCH_1, 10))
    assert ref_std != pytest.approx(statistics.stdev(BATCH_1))  # so the order is observable
    out = trainer.clip_and_scale(torch.tensor(BATCH_1))
    assert trainer.ref_std == pytest.approx(ref_std, rel=1e-6)
    assert close(out, [x / ref_std for x in clip(BATCH_1, 10)])
    out = trainer.clip_and_scale(torch.tensor(BATCH_2))
    assert close(out, [x / ref_std for x in clip(BATCH_2, 10)])  # still the first batch's std


def test_a_given_ref_std_is_used_as_is(tiny_kit):
    """trlX's `method.ref_std`: when set, the reference std is that number, not the first batch's."""
    trainer = scorer(tiny_kit, "method.cliprange_reward=10", "method.scale_reward=ref", "method.ref_std=2.5")
    out = trainer.clip_and_scale(torch.tensor(BATCH_1))
    assert trainer.ref_std == 2.5
    assert close(out, [x / 2.5 for x in clip(BATCH_1, 10)])


def test_running_scaling_divides_by_the_running_std_of_clipped_scores(tiny_kit):
    """trlX `scale_reward: running`: the running moments are of the clipped scores (merged over batches: the sample
    std of every clipped score so far), and each batch is divided by the std after folding it in."""
    trainer = scorer(tiny_kit, "method.cliprange_reward=10", "method.scale_reward=running")
    seen: list[float] = []
    for batch in (BATCH_1, BATCH_2):
        clipped = clip(batch, 10)
        seen += clipped
        out = trainer.clip_and_scale(torch.tensor(batch))
        assert trainer.running.mean == pytest.approx(statistics.fmean(seen), rel=1e-9, abs=1e-9)
        assert trainer.running.std == pytest.approx(statistics.stdev(seen), rel=1e-9)
        assert close(out, [x / statistics.stdev(seen) for x in clipped])


@pytest.mark.parametrize("scale", ["ignored", "null", "false", "whatever"])
def test_other_scale_reward_values_scale_nothing(tiny_kit, scale):
    """trlX scales only for `running` and `ref`; `ignored` (its example configs) or anything else leaves the clipped
    scores as they are, while the statistics are still kept (of the clipped scores)."""
    trainer = scorer(tiny_kit, "method.cliprange_reward=10", f"method.scale_reward={scale}")
    assert trainer.config.method.scaling is None
    out = trainer.clip_and_scale(torch.tensor(BATCH_1))
    assert out.tolist() == clip(BATCH_1, 10)
    assert trainer.ref_std == pytest.approx(statistics.stdev(clip(BATCH_1, 10)), rel=1e-6)
    assert trainer.running.std == pytest.approx(statistics.stdev(clip(BATCH_1, 10)), rel=1e-9)


def test_cliprange_reward_0_does_not_clip(tiny_kit):
    """trlX: `cliprange_reward: 0` is falsy and turns clipping off (a score of 50 stays 50)."""
    trainer = scorer(tiny_kit, "method.cliprange_reward=0", "method.scale_reward=ignored")
    assert trainer.clip_and_scale(torch.tensor(BATCH_1)).tolist() == BATCH_1
    assert trainer.ref_std == pytest.approx(statistics.stdev(BATCH_1), rel=1e-6)

    trainer = scorer(tiny_kit, "method.cliprange_reward=0", "method.scale_reward=ref")
    assert close(trainer.clip_and_scale(torch.tensor(BATCH_1)), [x / statistics.stdev(BATCH_1) for x in BATCH_1])


# -- 5. gen_experience_kwargs ------------------------------------------------------------------------------------------


def test_rollouts_use_gen_experience_kwargs_and_evaluation_gen_kwargs(tiny_kit):
    """trlX samples rollouts with `gen_experience_kwargs` when set and evaluates with `gen_kwargs` (here
    min_new_tokens=12 makes evaluation sample exactly 12 tokens, and leaks into rollouts if they used gen_kwargs)."""
    trainer, _ = build(tiny_gpt2(tiny_kit), "method.gen_kwargs.min_new_tokens=12",
                       "method.gen_experience_kwargs.max_new_tokens=3")
    rollouts = trainer.generate(PROMPTS)
    assert rollouts.responses.shape[1] <= 3 and rollouts.mask.sum(1).max() <= 3
    evaluation = trainer.generate(PROMPTS, evaluation=True)
    assert evaluation.responses.shape[1] == 12 and evaluation.mask.sum(1).tolist() == [12.0] * len(PROMPTS)
    assert trainer.step()["rollout/response_length"] <= 3


def test_gen_kwargs_may_name_the_special_tokens(tiny_kit):
    """trlX configs may set eos_token_id / pad_token_id in gen_kwargs: they take the place of the defaults."""
    eos = 0  # the tiny tokenizer's end-of-text id
    trainer, _ = build(tiny_gpt2(tiny_kit), f"method.gen_kwargs.eos_token_id={eos}",
                       f"method.gen_kwargs.pad_token_id={eos}")
    assert len(trainer.generate(PROMPTS)) == len(PROMPTS)


def test_without_gen_experience_kwargs_rollouts_use_gen_kwargs(tiny_kit):
    trainer, _ = build(tiny_gpt2(tiny_kit), "method.gen_kwargs.min_new_tokens=12")
    assert trainer.config.method.gen_experience_kwargs is None
    rollouts = trainer.generate(PROMPTS)
    assert rollouts.responses.shape[1] == 12 and rollouts.mask.sum(1).tolist() == [12.0] * len(PROMPTS)


# -- 6. half-precision checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_train_in_float32(tiny_kit, tmp_path, dtype):
    """trlX loads bf16/fp16 checkpoints and trains them: here the master weights are float32 (AdamW in half
    precision breaks) and so is the value head; two iterations give finite stats."""
    AutoModelForCausalLM.from_pretrained(tiny_gpt2(tiny_kit)).to(dtype).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_gpt2(tiny_kit)).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == dtype  # the checkpoint is half precision

    trainer, _ = build(tmp_path)
    for _ in range(2):
        stats = trainer.step()
        bad = {k: v for k, v in stats.items() if not math.isfinite(v)}
        assert not bad
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.policy.value_head.parameters()} == {torch.float32}


# -- 7. the scheduler --------------------------------------------------------------------------------------------------


def test_linear_scheduler_steps_once_per_optimizer_step(tiny_kit, monkeypatch):
    """trlX steps the scheduler after every optimizer step and sizes it in optimizer steps: with T iterations of
    spi steps, the lr after k steps is lr0 * (1 - k / (T * spi)), and each step uses the lr before it."""
    total = 5
    trainer, _ = build(tiny_gpt2(tiny_kit), "scheduler.name=linear", f"train.total_steps={total}")
    spi = trainer.config.optimizer_steps_per_iteration
    assert spi == 2 * 16 // 8 == 4
    lr0 = trainer.config.optimizer.kwargs.lr
    used: list[float] = []
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", spy)
    for iteration in (1, 2):
        stats = trainer.step()
        expected = lr0 * (1 - iteration * spi / (total * spi))
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
        assert stats["ppo/learning_rate"] == pytest.approx(expected, rel=1e-9)
    assert used == pytest.approx([lr0 * (1 - k / (total * spi)) for k in range(2 * spi)], rel=1e-9)


# -- 8. the KL controller ----------------------------------------------------------------------------------------------


def adaptive(value: float, kl: float, target: float, horizon: int, n_steps: int, times: int) -> float:
    for _ in range(times):
        value *= 1 + min(max(kl / target - 1, -0.2), 0.2) * n_steps / horizon
    return value


def test_adaptive_kl_controller_updates_once_per_ppo_epoch(tiny_kit):
    """trlX updates the adaptive controller after each of the ppo_epochs passes, with n_steps = batch_size:
    coef' = coef * prod_epochs (1 + clip(kl / target - 1, -0.2, 0.2) * batch_size / horizon)."""
    sets = ("method.init_kl_coef=0.1", "method.horizon=100", "optimizer.kwargs.lr=1e-3")
    first, _ = build(tiny_gpt2(tiny_kit), *sets, "method.target=6")
    s1 = first.step()
    assert s1["objective/kl"] == 0.0 and s1["objective/kl_coef"] == 0.1
    expected = adaptive(0.1, 0.0, 6, 100, 8, 2)  # error clipped to -0.2
    assert first.kl_ctl.value == pytest.approx(expected, rel=1e-12)
    assert s1["objective/kl_coef_next"] == pytest.approx(expected, rel=1e-12)
    kl2 = first.step()["objective/kl"]
    assert kl2 > 0

    # Same seed, a target the second step's KL sits inside the clip range of: the unclipped branch (the first step's
    # update is -0.2-clipped whatever the target, so the second rollouts are the same).
    target = kl2 * 1.1
    second, _ = build(tiny_gpt2(tiny_kit), *sets, f"method.target={target}")
    second.step()
    coef = second.kl_ctl.value
    assert coef == pytest.approx(expected, rel=1e-12)
    s2 = second.step()
    kl = s2["objective/kl"]
    assert -0.2 < kl / target - 1 < 0.2
    assert s2["objective/kl_coef"] == coef
    assert second.kl_ctl.value == pytest.approx(adaptive(coef, kl, target, 100, 8, 2), rel=1e-12)
    assert second.kl_ctl.value != pytest.approx(adaptive(coef, kl, target, 100, 8, 1), rel=1e-9)  # not once


# -- 9. fractional intervals -------------------------------------------------------------------------------------------


def config_with(**train) -> TrainerConfig:
    return TrainerConfig(model={"model_path": "unused"}, train=train)


def test_fractional_eval_interval_evaluates_where_trlx_would():
    """trlX evaluates every eval_interval optimizer steps: 100 steps at 16 an iteration is 6.25 iterations, so the
    evaluations fall in iterations 7, 13, 19, 25, 32, 38 (steps 100, 200, ... 600), and at the end (40)."""
    config = config_with(total_steps=40, eval_interval=6.25, checkpoint_interval=6.25)
    assert [i for i in range(1, 41) if config.evaluates_after(i)] == [7, 13, 19, 25, 32, 38, 40]
    assert [i for i in range(1, 41) if config.checkpoints_after(i)] == [7, 13, 19, 25, 32, 38, 40]


def test_a_third_is_exact_at_its_multiples():
    """100/3 (as a float) is read as 100/3: multiple 100 is reached in iteration 100, not 99 or 101."""
    interval = 100 / 3
    hits = [i for i in range(1, 301) if reaches_multiple(i, interval)]
    assert hits == [math.ceil(k * Fraction(100, 3)) for k in range(1, 10)] == [34, 67, 100, 134, 167, 200, 234, 267,
                                                                                 300]
    config = config_with(total_steps=250, eval_interval=interval)
    assert [i for i in range(1, 251) if config.evaluates_after(i)] == [34, 67, 100, 134, 167, 200, 234, 250]


@pytest.mark.parametrize("interval", [1, 2, 3, 5, 7, 10, 16])
def test_integer_intervals_are_plain_modulo(interval):
    assert [i for i in range(1, 201) if reaches_multiple(i, interval)] == \
        [i for i in range(1, 201) if i % interval == 0]
    config = config_with(total_steps=50, eval_interval=interval, checkpoint_interval=interval)
    expected = [i for i in range(1, 51) if i % interval == 0 or i == 50]
    assert [i for i in range(1, 51) if config.evaluates_after(i)] == expected
    assert [i for i in range(1, 51) if config.checkpoints_after(i)] == expected
