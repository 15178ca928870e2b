"""bench/rehearsal.py in its smallest form: the real-size models, the preset shrunk by --smoke, one iteration, the
reward in process. Checks the JSON line it prints: every phase timed, and a projection that adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PHASES = ("generate", "score", "forward", "update", "other", "iteration")


def test_rehearsal_smallest_form_reports_phases_and_projection():
    cmd = [sys.executable, str(ROOT / "bench" / "rehearsal.py"), "--smoke", "--iterations", "1", "--reward",
           "inprocess", "--device", "cpu", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])

    assert report["device"] == "cpu" and report["torch_threads"] == 1 and report["target_met"] is None
    assert report["models"]["policy_params_millions"] > 120  # GPT-2 small at its real size, vocabulary included
    [row] = report["iterations"]
    assert not report["warmup_skipped"]  # one iteration: nothing to skip
    for phase in PHASES:
        assert phase in row and phase in report["mean_s"]
    assert all(row[p] > 0 for p in ("generate", "score", "forward", "update", "iteration"))
    assert row["other"] >= 0 and row["peak_rss_mb"] > 0
    assert len(report["evaluation_s"]) == 2 and len(report["checkpoint_save_s"]) == 1  # start, end; the end's save

    full = report["preset"]["full_run"]
    assert full["iterations"] == 100  # the preset's translation, whatever --smoke shrinks
    expected = (full["iterations"] * report["mean_s"]["iteration"] + full["evaluations"] *
                report["evaluation_s_used"] + full["checkpoints"] * report["checkpoint_save_s_used"])
    assert report["projected_full_run_s"] == pytest.approx(expected, abs=0.2)
    assert report["projected_full_run_min"] == pytest.approx(report["projected_full_run_s"] / 60, abs=0.01)
    assert report["projected_full_run_with_startup_s"] >= report["projected_full_run_s"]
