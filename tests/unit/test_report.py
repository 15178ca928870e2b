"""The report's account of which checkpoint its examples use and why, its summary table, and its plots."""

from __future__ import annotations

from pathlib import Path

from services.trainer.report import Choice, Samples, choice_sentence, plot, plot_reward_kl, summary_table
from shared.checkpoints import CheckpointInfo

PNG = b"\x89PNG\r\n\x1a\n"


def checkpoint(step: int, **metrics) -> CheckpointInfo:
    return CheckpointInfo(f"tiny/step-{step}", Path(f"runs/tiny/step-{step}"), "tiny", step, 0.0, metrics)


def evals(*points: tuple[int, float, float]) -> dict[int, dict]:
    return {step: {"step": step, "eval/reward_mean": reward, "eval/kl": kl, "eval/response_length": 12.0}
            for step, reward, kl in points}


EVALS = evals((0, 0.5, 0.0), (20, 0.931, 2.5), (40, 0.912, 4.0))
SAMPLES = Samples(["a", "b"], [], [0.25, 0.75], [], [0.75, 0.875])


def test_best_before_the_end_is_named_with_the_last_beside_it():
    choice = Choice(checkpoint(20), checkpoint(40), "tiny/step-20")
    assert choice_sentence(choice, EVALS) == ("Examples use `tiny/step-20`: the best eval reward (0.931 at step 20). "
                                              "The last checkpoint is `tiny/step-40` (eval reward 0.912).")


def test_a_last_checkpoint_that_is_the_best_says_so():
    last = checkpoint(40)
    choice = Choice(last, last, "tiny/step-40")
    assert choice_sentence(choice, evals((0, 0.5, 0.0), (40, 0.95, 3.0))) == (
        "Examples use `tiny/step-40`: the last checkpoint, which is also the best (eval reward 0.950 at step 40).")


def test_without_a_best_the_last_checkpoint_is_used_and_why():
    last = checkpoint(40)
    assert choice_sentence(Choice(last, last, None), EVALS) == (
        "Examples use `tiny/step-40`: the last checkpoint: no evaluation picked a best.")


def test_a_best_not_evaluated_at_its_own_step_gives_the_value_it_was_picked_by():
    choice = Choice(checkpoint(30, **{"eval/reward_mean": 0.9}), checkpoint(45), "tiny/step-30")
    assert choice_sentence(choice, EVALS) == ("Examples use `tiny/step-30`: the best eval reward (0.900). The last "
                                              "checkpoint is `tiny/step-45` (not evaluated).")


def table(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()]


def test_the_summary_has_before_the_examples_and_the_last_step_each_with_its_step():
    rows = table(summary_table(Choice(checkpoint(20), checkpoint(40), "tiny/step-20"), EVALS, SAMPLES))
    assert rows[0] == ["", "before (step 0)", "examples: `tiny/step-20` (step 20)", "last: `tiny/step-40` (step 40)"]
    assert rows[2] == ["eval reward (mean)", "0.500", "0.931", "0.912"]
    assert rows[3] == ["eval KL to reference (nats)", "0.000", "2.500", "4.000"]
    assert rows[5] == ["reward of the examples below", "0.500", "0.812", "n/a"]


def test_the_summary_has_no_last_column_when_the_examples_use_the_last_checkpoint():
    last = checkpoint(40)
    rows = table(summary_table(Choice(last, last, "tiny/step-40"), EVALS, SAMPLES))
    assert rows[0] == ["", "before (step 0)", "examples: `tiny/step-40` (step 40)"]
    assert rows[2] == ["eval reward (mean)", "0.500", "0.912"]


def test_both_plots_are_written_as_png(tmp_path):
    metrics = [{"step": 0, **EVALS[0]}]
    for step in range(1, 41):
        metrics.append({"step": step, "rollout/reward_mean": step / 40, "objective/kl": step / 10})
        if step in EVALS:
            metrics.append(EVALS[step])
    plot(metrics, tmp_path / "report.png")
    plot_reward_kl(metrics, tmp_path / "report_reward_kl.png", examples_step=20)
    plot_reward_kl(metrics[:1], tmp_path / "one_point.png")  # one evaluation, no rollout yet
    for name in ("report.png", "report_reward_kl.png", "one_point.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
