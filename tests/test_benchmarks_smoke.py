"""The benchmark scripts under docs/benchmarks run end to end on tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "docs" / "benchmarks"


def test_decompositions_benchmark_smoke(tmp_path):
    script = BENCHMARKS / "decompositions.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "decompositions.json").read_text())
    names = {row["decomposition"] for row in result["rows"]}
    assert names == {"tucker2", "cp3", "cp4"}
    for row in result["rows"]:
        assert row["ours_s"] > 0 and row["baseline_s"] > 0
        assert 0 <= row["ours_error"] < 1 and 0 <= row["baseline_error"] < 1
    assert "| tucker2 |" in (tmp_path / "decompositions.md").read_text()
    assert "speedup" in done.stdout


def test_engine_equivalence_runs_are_deterministic(tmp_path):
    script = BENCHMARKS / "engine_equivalence.py"
    for name in ("a.json", "b.json"):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / name)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    first = (tmp_path / "a.json").read_text()
    assert first == (tmp_path / "b.json").read_text()  # a run can be compared bit for bit
    runs = json.loads(first)
    assert set(runs) == {"plain", "whiten+layer refine", "budget+model refine",
                         "budget svd whiten model refine"}
    refined = [layer for step in runs["whiten+layer refine"]["reports"] for layer in step["layers"]]
    assert any(layer["refined_from"] is not None for layer in refined)
