"""The rank-rule benchmark runs (smoke mode: a few ResNet-18 layers) and writes its results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "rank_rules.py"


def test_rank_rules_benchmark_smoke(tmp_path):
    # A subprocess, so the script's thread settings apply before numpy and torch load.
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--threads", "1",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| resnet18 |" in done.stdout and "rank mismatches" in done.stdout
    results = json.loads((tmp_path / "rank_rules.json").read_text())
    rules = results["models"]["resnet18"]["rules"]
    assert set(rules) == {"param_reduction", "flop_reduction", "vbmf", "energy"}
    assert all(r["seconds"] >= 0 and r["params_ratio"] >= 1 for r in rules.values())
    assert results["models"]["resnet18"]["evbmf"]["rank_mismatches"] == 0
    assert (tmp_path / "rank_rules.md").read_text().startswith("Rank rules over every layer")
