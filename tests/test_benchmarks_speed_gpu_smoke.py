"""docs/benchmarks/speed_gpu.py runs in --smoke mode on the CPU (tiny model, one configuration)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).parents[1] / "docs" / "benchmarks"


def test_speed_gpu_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        result = importlib.import_module("speed_gpu").main(["--smoke", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)
    assert len(result["rows"]) == 1 and result["skipped"] == []
    row = result["rows"][0]
    assert (row["model"], row["dtype"], row["mode"], row["format"]) == (
        "tiny-resnet", "float32", "eager", "channels_last")
    assert row["FLOPs x"] > 1 and row["original ms"] > 0 and row["compressed ms"] > 0
    data = json.loads((tmp_path / "speed_gpu.json").read_text())
    assert data["meta"]["device"] == "CPU (smoke)"
    assert "| tiny-resnet | float32 | 2 | eager | channels_last |" in (
        tmp_path / "speed_gpu.md").read_text()
