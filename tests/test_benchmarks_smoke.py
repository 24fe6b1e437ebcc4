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
