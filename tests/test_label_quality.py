"""The label-task lab (benchmarks/label_quality.py): one --quick run for its output's structure and sanity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_label_lab_writes_every_arm(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "label_quality.py"), "--quick", "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    arms = figures["arms"]
    assert set(arms) == {"sft", "rationale_xr50", "rationale_xr100"}
    assert all(0.0 <= a["accuracy_mean"] <= 1.0 and a["seeds"][0]["exit_code"] == 0 for a in arms.values())
    # sft buys no reasons, XR = 1 a reason on (nearly) every row, XR = 0.5 on about half
    assert arms["sft"]["rationale_rows_mean"] == 0
    xr50, xr100 = arms["rationale_xr50"], arms["rationale_xr100"]
    assert xr100["rationale_rows_mean"] >= 0.9 * xr100["labelled_rows_mean"]
    assert 0.3 < xr50["rationale_rows_mean"] / xr50["labelled_rows_mean"] < 0.7
    assert arms["sft"]["usd_mean"] < xr50["usd_mean"] < xr100["usd_mean"]  # reasons cost output tokens
    assert 0.3 < figures["majority"] < 0.65  # of 3 labels (the world: 37% neutral), on a small held-out set
    table = (tmp_path / "out" / "quality_labels.md").read_text()
    assert "rationale_xr50" in table and "majority label" in table
