"""The data-aware benchmarks (inverted-residual net on Fashion-MNIST, MiniLM) run in smoke mode.

Smoke runs use synthetic images, a tiny random transformer and random text, so neither
Fashion-MNIST nor the ``bench`` extras (sentence-transformers, the MiniLM model, gensim)
are needed; the MiniLM part needs scipy and is skipped cleanly without it.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "docs" / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)


def _read(out: Path, name: str) -> tuple[dict, str]:
    return json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


def test_mobile_benchmark_smoke(bench, tmp_path):
    mobile = bench("mobile_fashion_mnist")
    mobile.main(["--smoke", "--synthetic", "--threads", "1", "--variants", "0,2,5,7",
                 "--out", str(tmp_path)])
    data, md = _read(tmp_path, "mobile")
    assert data == json.loads(json.dumps(data))
    assert [r["variant"] for r in data["rows"]] == [
        "original", "plain", "whitened", "whitened, sequential + model refine",
        "budget, whitened, sequential + model refine"]
    for row in data["rows"][1:]:
        assert set(mobile.COLUMNS) <= set(row)
        assert row["FLOPs x"] > 1.3 and row["params x"] > 1
        assert 0 <= row["acc"] <= 100
        assert row["delta"] == pytest.approx(row["acc"] - data["rows"][0]["acc"])
    plain, whitened, refined, budget = data["rows"][1:]
    assert plain["stats s"] == 0 and whitened["stats s"] > 0  # plain SVD collects nothing
    assert 0 <= whitened["mean output error"] and refined["refine s"] > 0
    assert budget["FLOPs x"] >= 1.5 * 0.99  # scope = "model": the whole model's 1.5x
    assert [v["variant"] for v in data["verdicts"]] == [r["variant"] for r in data["rows"][1:]]
    assert "## Targets" in md and "| whitened |" in md
    assert len(data["meta"]["layers"]["whitened"]) == 11  # one report per 1x1 conv


def test_minilm_data_aware_benchmark_smoke(bench, tmp_path):
    pytest.importorskip("scipy")
    minilm = bench("minilm_data_aware")
    minilm.main(["--smoke", "--synthetic", "--threads", "1", "--variants", "0,1,2",
                 "--unrelated-variants", "1", "--out", str(tmp_path)])
    data, md = _read(tmp_path, "minilm_data_aware")
    rows = data["rows"]
    assert [(r["calibration"], r["rate"], r["variant"]) for r in rows] == [
        ("-", "original", "-"), ("none", 2.0, "plain"), ("in-domain", 2.0, "whitened"),
        ("in-domain", 2.0, "whitened, sequential"), ("unrelated", 2.0, "whitened")]
    for row in rows[1:]:
        assert set(minilm.COLUMNS) <= set(row)
        assert row["linear FLOPs x"] > 1.5
        assert -1 <= row["Lee pearson"] <= 1 and -1 <= row["cos to original"] <= 1
    assert rows[2]["mean output error"] >= 0 and rows[2]["stats s"] > 0
    assert [v["met"] in (True, False) for v in data["verdicts"]] == [True]
    assert "| in-domain |" in md and "| unrelated |" in md
