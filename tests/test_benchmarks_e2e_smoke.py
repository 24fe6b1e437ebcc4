"""The end-to-end benchmarks (CNN, MiniLM, CPU speed) run in smoke mode, and their helpers work.

Smoke runs use synthetic data and models, so no dataset or model needs to be installed;
where Fashion-MNIST, MiniLM or gensim's data are installed, their loaders are also exercised
on a tiny slice (skipped with an install hint otherwise).
"""

from __future__ import annotations

import gzip
import importlib
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).parents[1] / "docs" / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """Import a benchmark module by name from docs/benchmarks."""
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)


def _read(out: Path, name: str) -> tuple[dict, str]:
    return json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


def test_cnn_benchmark_smoke(bench, tmp_path):
    result = bench("cnn_fashion_mnist").main(
        ["--smoke", "--synthetic", "--threads", "1", "--configs", "0,4", "--out", str(tmp_path)])
    data, md = _read(tmp_path, "cnn")
    assert data == json.loads(json.dumps(data))
    schemes = [(r["conv"], r["rank rule"], r["scheme"]) for r in data["rows"]]
    assert schemes == [("-", "-", "original"),
                       ("tucker2", "param_reduction", "one-shot"),
                       ("tucker2", "param_reduction", "multi-stage"),
                       ("tucker2 whitened", "param_reduction", "one-shot"),
                       ("tucker2 whitened", "param_reduction", "multi-stage")]
    for row in data["rows"][1:]:
        assert row["FLOPs x"] > 1 and row["params x"] > 1
        assert 0 <= row["acc after FT"] <= 100
        assert row["FT steps"] == data["rows"][1]["FT steps"]  # same budget everywhere
    assert len(result["verdicts"]) == 2
    assert "| tucker2 | param_reduction |" in md and "## Targets" in md


def test_minilm_benchmark_smoke(bench, tmp_path):
    bench("minilm_linear").main(["--smoke", "--synthetic", "--threads", "1",
                                 "--out", str(tmp_path)])
    data, md = _read(tmp_path, "minilm")
    original, compressed = data["rows"]
    assert original["rate"] == "original" and compressed["rate"] == 2.0
    assert compressed["linear params x"] > 1.5 and compressed["FLOPs x"] > 1.5
    assert -1 <= compressed["cos to original"] <= 1
    for key in ("Lee pearson", "Lee spearman", "SimLex-999", "WordSim-353"):
        assert -1 <= compressed[key] <= 1
    assert "| original |" in md


def test_speed_benchmark_smoke(bench, tmp_path):
    bench("speed_cpu").main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    data, md = _read(tmp_path, "speed")
    formats = {r["format"] for r in data["rows"]}
    assert formats == {"contiguous", "channels_last"}
    variants = {r["variant"] for r in data["rows"]}
    assert variants == {"original", "2x", "2x round_to=8"}
    assert all(r["median ms"] > 0 for r in data["rows"])
    assert all(r["FLOPs x"] > 1 for r in data["summary"] if r["variant"] != "original")
    assert "## Summary" in md


# -- helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_raw_and_gzip(bench, tmp_path, compress):
    common = bench("_common")
    images = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    raw = struct.pack(">HBB3I", 0, 0x08, 3, 3, 4, 5) + images.numpy().tobytes()
    path = tmp_path / ("x-idx3-ubyte" + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(raw) if compress else raw)
    assert torch.equal(common.read_idx(path), images)
    path.write_bytes(raw[:-1])
    if not compress:
        with pytest.raises(ValueError, match="expected 60 bytes"):
            common.read_idx(path)


def test_fashion_mnist_loader_on_a_slice(bench):
    common = bench("_common")
    root = common.fashion_mnist_dir()
    if root is None:
        pytest.skip(common.FASHION_HINT)
    x, y, xt, yt = common.load_fashion_mnist(root, limit=16)
    assert x.shape == (16, 1, 28, 28) and xt.shape == (16, 1, 28, 28)
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(10))


def test_minilm_and_gensim_loaders_on_a_slice(bench):
    common = bench("_common")
    minilm = bench("minilm_linear")
    root = common.gensim_test_data()
    if root is None:
        pytest.skip(common.GENSIM_HINT)
    data = minilm.load_eval_data(root, smoke=True)
    assert len(data["docs"]) == 6 and data["doc_sims"].shape == (6, 6)
    assert len(data["simlex"]) == len(data["wordsim"]) == 20
    path = common.minilm_path()
    if path is None:
        pytest.skip(common.MINILM_HINT)
    embedder = minilm.SentenceEmbedder(path)
    emb = embedder.encode(data["docs"][:2])
    assert emb.shape == (2, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert embedder.example_inputs(data["docs"][0], tokens=16).shape == (1, 16, 384)


def test_speed_helper_reports_and_advises():
    from musco_core.speed import SpeedReport, benchmark

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1))
    before = [p.clone() for p in model.parameters()]
    report = benchmark(model, {"small": small}, torch.randn(1, 3, 16, 16), warmup=1, repeats=3,
                       num_threads=1)
    assert isinstance(report, SpeedReport)
    assert {(t.model, t.memory_format) for t in report.timings} == {
        (m, f) for m in ("original", "small") for f in ("contiguous", "channels_last")}
    assert all(len(t.times) == 3 and t.median > 0 for t in report.timings)
    assert report.speedup("original", "contiguous") == 1.0
    assert report.best("small").memory_format in ("contiguous", "channels_last")
    assert "small: fastest in" in report.advice()
    assert "speedup" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["baseline"] == "original"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model[0].weight.is_contiguous()  # timed copies, not the model itself
    with pytest.raises(ValueError, match="unknown memory format"):
        benchmark(model, small, torch.randn(1, 3, 8, 8), memory_formats=("nhwc",))
    with pytest.raises(KeyError, match="no timing"):
        report.timing("small", "nhwc")
