"""docs/benchmarks/latency_target.py runs in smoke mode and writes the expected table.

Timings are not asserted (the machine may be busy); only the shape of the result:
one row per model, setting and variant, with every column, and the targets table.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "docs" / "benchmarks"


@pytest.fixture
def latency_target():
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        yield importlib.import_module("latency_target")
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)


def test_latency_target_smoke(latency_target, tmp_path):
    lt = latency_target
    lt.main(["--smoke", "--models", "cnn,tiny-resnet", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "latency_target.json").read_text())
    md = (tmp_path / "latency_target.md").read_text()
    assert data["benchmark"] == "latency_target" and data["meta"]["smoke"] is True
    rows = data["rows"]
    # 2 models x 2 settings (batch 1 and 4, 1 thread) x 4 variants
    keys = [(r["model"], r["batch"], r["threads"], r["variant"]) for r in rows]
    assert keys == [(m, b, 1, v) for b in (1, 4) for m in ("cnn", "tiny-resnet")
                    for v in lt.VARIANTS]
    for row in rows:
        assert {"model", "batch", "threads", "variant", "plan format", "layer target",
                "note"} <= set(row)
        assert row["plan format"] in ("contiguous", "channels_last")
        if "measured x" not in row:  # a variant the budget could not build: says why
            assert row["note"]
            continue
        assert set(lt.COLUMNS) <= set(row)
        for col in ("FLOPs x", "predicted x", "measured x", "measured x at best"):
            assert row[col] > 0 and math.isfinite(row[col]), (col, row)
        assert -1.0 <= row["cosine"] <= 1.0 + 1e-9
        assert 0 <= row["slower layers"] <= row["layers compressed"]
    # the plain FLOP plan is built for every model and setting
    assert all("measured x" in r for r in rows if r["variant"] == "flop 2x")
    assert all(r["FLOPs x"] > 1.3 for r in rows if r["variant"] == "flop 2x")
    targets = data["targets"]
    assert targets and all(set(lt.TARGETS) <= set(t) for t in targets)
    assert {t["target"] for t in targets} >= {"measured >= 0.8 x FLOP ratio (best fmt)",
                                              "no compressed layer slower"}
    assert all(isinstance(t["met"], bool) for t in targets)
    assert "## Variants" in md and "## Targets" in md and "| flop 2x |" in md


def test_the_benchmark_leaves_the_engine_as_it_found_it(latency_target, tmp_path):
    # The benchmark memoises budget damage by layer name while it runs; a memo left
    # installed gave later tests another model's damage for layers of the same name.
    from musco_core import context as joint

    latency_target.main(["--smoke", "--models", "cnn", "--settings", "1x1",
                         "--out", str(tmp_path)])
    assert joint.RoundContext.damage.__module__ == "musco_core.context"  # not the memo


def test_a_reach_just_above_1_drops_the_rule_instead_of_asking_for_a_target_below_1(
        latency_target, monkeypatch):
    # The budget names its reach rounded ("reach at most 1.01x"); 0.98 of it is below 1,
    # which is not a valid target: the rule must be dropped, not retried.
    import musco_core as musco

    calls = []

    def fake_compress(model, example, rule_list, exclude, latency=None):
        calls.append([r.rank.params for r in rule_list])
        assert len(calls) < 3, f"retried: {calls}"  # rather than loop forever
        raise musco.CompressionError(
            "layer 'x': rank rule 'budget' failed: rule 0 ... reach at most 1.01x")

    monkeypatch.setattr(latency_target, "compress", fake_compress)
    compressor, targets, note = latency_target.compress_budget(
        None, None, False, [], None, 1.5, 4)
    assert compressor is None and targets == {}
    assert note == "svd: no rank measured faster, layers left as they are"
    assert len(calls) == 1
