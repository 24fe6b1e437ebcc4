"""The walkthroughs under docs/examples run as written, in smoke mode.

They fall back to synthetic data or a random stand-in model when Fashion-MNIST or MiniLM
are not installed, so these tests need neither.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).parents[1] / "docs" / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cnn_walkthrough_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = _load("cnn_walkthrough").main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert Path(result["state"]).is_file()
    assert result["param_ratio"] > 2 and result["flop_ratio"] > 2
    assert 0 <= result["accuracy"] <= 100


def test_minilm_walkthrough_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = _load("minilm_walkthrough").main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert Path(result["state"]).is_file()
    assert -1 <= result["cosine"] <= 1
