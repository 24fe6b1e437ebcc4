"""docs/benchmarks/lightning_ddp.py runs in smoke mode: 1 process and 2 DDP processes on CPU.

Slow (it starts three Python processes and Lightning's DDP); timings are not asserted, only
the shape of the result and that the two DDP ranks end with the same parameters.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch", reason="needs Lightning (pip install 'musco[lightning]')")

BENCHMARKS = Path(__file__).parents[1] / "docs" / "benchmarks"


def test_lightning_ddp_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("lightning_ddp")
    result = bench.main(["--smoke", "--synthetic", "--configs", "1x1,2x1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "lightning_ddp.json").read_text())
    md = (tmp_path / "lightning_ddp.md").read_text()
    rows = data["rows"]
    assert rows == result["rows"]
    assert [(r["processes"], r["threads/process"]) for r in rows] == [(1, 1), (2, 1)]
    assert [r["ranks identical"] for r in rows] == ["-", "yes"]
    for row in rows:
        assert row["done"] and row["source"] == "synthetic stand-in"
        assert row["global batch"] == rows[0]["global batch"] and row["epochs"] == 3
        assert 0 <= row["acc before %"] <= 100 and 0 <= row["acc after %"] <= 100
        assert row["params x"] > 1 and row["FLOPs x"] > 1
        assert row["fit s"] > 0 and row["wall s"] >= row["fit s"]
    assert rows[0]["params after"] == rows[1]["params after"]  # same ranks chosen
    assert "| 2 | 1 |" in md and "do **not** show a" in md
