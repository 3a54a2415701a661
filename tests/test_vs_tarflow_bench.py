"""benchmarks/vs_tarflow.py runs (`--quick`, once): not a timing test, only that the side-by-side benchmark against
apple/ml-tarflow works end to end and writes the JSON it documents. Skipped, saying why, without the reference."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("ML_TARFLOW", ROOT.parent / "shared" / "reference" / "ml-tarflow"))


def test_vs_tarflow_quick_writes_paired_ratios_for_every_case_with_the_load_average(tmp_path):
    """Every case (exact sampling unguided and guided at two batches, a training step) has both median times, the
    median of its paired ratios (reference / ours) and its target; the two models were checked equal first."""
    if not (REFERENCE_DIR / "transformer_flow.py").is_file():
        pytest.skip(f"ml-tarflow reference not found at {REFERENCE_DIR} (set ML_TARFLOW to a clone of apple/ml-tarflow)")
    out = tmp_path / "vs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_tarflow.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "ML_TARFLOW": str(REFERENCE_DIR)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and len(result["machine"]["loadavg_before"]) == 3
    assert all(err < 1e-4 for err in result["max_rel_diff_z"].values())
    cases = {(r["case"], r["batch"]) for r in result["rows"]}
    assert cases == {("sample_unguided", 1), ("sample_unguided", 2), ("sample_guided", 1), ("sample_guided", 2),
                     ("train_step", 4)}
    for row in result["rows"]:
        assert row["ref_ms"] > 0 and row["ours_ms"] > 0 and math.isfinite(row["ratio"])
        assert row["ratio"] == pytest.approx(row["ref_ms"] / row["ours_ms"])  # one pair: its ratio is the median
        assert row["target"] == result["targets"][row["case"]]
