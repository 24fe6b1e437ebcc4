"""musco_core.speed.benchmark: measured through torch.utils.benchmark.Timer; no test asserts a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import musco_core.speed as speed


class FakeMeasurement:
    def __init__(self, median):
        self.median = median


class FakeTimer:
    """Stands in for torch.utils.benchmark.Timer: each model's median is its parameter count."""

    made: list = []

    def __init__(self, stmt, num_threads, globals):
        self.stmt, self.num_threads, self.globals = stmt, num_threads, globals
        FakeTimer.made.append(self)

    def blocked_autorange(self, min_run_time):
        assert torch.is_inference_mode_enabled()
        # the statement runs (the real Timer would time it)
        eval(self.stmt, dict(self.globals))
        return FakeMeasurement(float(sum(p.numel() for p in self.globals["model"].parameters())))


@pytest.fixture
def fake_timer(monkeypatch):
    FakeTimer.made = []
    monkeypatch.setattr(speed, "Timer", FakeTimer)
    return FakeTimer


def test_benchmark_measures_every_model_and_format_with_the_timer(fake_timer):
    big = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.LazyLinear(4))
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(1, 3, 8, 8)
    big(x), small(x)
    report = speed.benchmark(big, small, x, repeats=3, warmup=1, num_threads=2)
    assert len(fake_timer.made) == 4 and {t.num_threads for t in fake_timer.made} == {2}
    assert {(t.model, t.memory_format) for t in report.timings} == {
        ("original", "contiguous"), ("original", "channels_last"),
        ("compressed", "contiguous"), ("compressed", "channels_last")}
    assert all(len(t.times) == 3 for t in report.timings)
    p_big = sum(p.numel() for p in big.parameters())
    p_small = sum(p.numel() for p in small.parameters())
    assert report.speedup("compressed", "contiguous") == pytest.approx(p_big / p_small)
    assert "faster than" in report.advice()
    cl = [t for t in fake_timer.made if t.globals["inputs"].is_contiguous(
        memory_format=torch.channels_last) and not t.globals["inputs"].is_contiguous()]
    assert len(cl) == 2  # the channels_last runs got channels_last inputs


def test_benchmark_uses_the_current_thread_count_by_default(fake_timer, one_thread):
    speed.benchmark(nn.Linear(4, 4), nn.Linear(4, 4), torch.randn(2, 4),
                    memory_formats=("contiguous",), repeats=1, warmup=0)
    assert {t.num_threads for t in fake_timer.made} == {1}


def test_benchmark_with_the_real_timer_runs(one_thread):
    report = speed.benchmark(nn.Linear(8, 8), {"a": nn.Linear(8, 8)}, torch.randn(2, 8),
                             memory_formats=("contiguous",), repeats=2, warmup=1)
    assert all(t.median > 0 for t in report.timings)
    assert str(report).startswith("model")


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="memory format"):
        speed.benchmark(nn.Linear(2, 2), nn.Linear(2, 2), torch.randn(1, 2),
                        memory_formats=("nhwc",))
    with pytest.raises(ValueError, match="min_run_time"):
        speed.benchmark(nn.Linear(2, 2), nn.Linear(2, 2), torch.randn(1, 2), min_run_time=-1)
