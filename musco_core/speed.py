"""Measure what compression buys in wall-clock time: latency of models side by side.

Fewer FLOPs do not always mean less time. A factorized conv is three small convs instead
of one big one, and on CPU their speed depends on the memory format and on the ranks (ragged
channel counts use slower kernels). Measure on the hardware you deploy to::

    from musco_core.speed import benchmark

    report = benchmark(model, compressor.model, torch.randn(1, 3, 224, 224))
    print(report)            # median latency per model and memory format, speedups
    print(report.advice())   # which format to deploy, and whether compression paid off

All models run in eval mode under ``torch.inference_mode`` in one process, interleaved
(every repeat times each model and format once, in rotating order), so that a machine
getting busier or quieter affects them alike. Each measurement is a
:class:`torch.utils.benchmark.Timer` measurement (``blocked_autorange``), which
synchronises CUDA (and other accelerators) before reading the clock, so GPU timings
measure the work and not only the kernel launches, and which runs the model under the
requested thread count.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils import benchmark as _benchmark

from musco_core.stats import run_model

#: The timer class used by :func:`benchmark` (tests replace it with a fake one).
Timer = _benchmark.Timer

#: Memory format names accepted by :func:`benchmark`.
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@attrs.frozen
class Timing:
    """Latencies of one model in one memory format, in seconds."""

    model: str
    memory_format: str
    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "memory_format": self.memory_format,
                "median_s": self.median, "times_s": list(self.times)}


@attrs.frozen
class SpeedReport:
    """The result of :func:`benchmark`: one :class:`Timing` per model and memory format.

    ``baseline`` names the reference model (the first one given).
    """

    timings: tuple[Timing, ...]
    baseline: str

    def timing(self, model: str, memory_format: str) -> Timing:
        for t in self.timings:
            if t.model == model and t.memory_format == memory_format:
                return t
        known = sorted({(t.model, t.memory_format) for t in self.timings})
        raise KeyError(f"no timing for model {model!r} in {memory_format!r}; have {known}")

    def speedup(self, model: str, memory_format: str, *,
                baseline_format: str | None = None) -> float:
        """Baseline median / ``model`` median; the baseline in ``baseline_format``
        (default: the same format as ``model``)."""
        base = self.timing(self.baseline, baseline_format or memory_format)
        return base.median / self.timing(model, memory_format).median

    def best(self, model: str) -> Timing:
        """The fastest memory format of ``model``."""
        return min((t for t in self.timings if t.model == model), key=lambda t: t.median)

    def advice(self) -> str:
        """Which memory format to use, and whether each model beats the baseline at its best.

        Follows docs/benchmarks.md: factorized conv nets usually run best in
        ``channels_last`` on CPU, and their speedup is well below their FLOP ratio.
        """
        base = self.best(self.baseline)
        lines = [f"{self.baseline}: fastest in {base.memory_format} "
                 f"({base.median * 1e3:.2f} ms)"]
        for name in dict.fromkeys(t.model for t in self.timings):
            if name == self.baseline:
                continue
            best = self.best(name)
            gain = base.median / best.median
            verdict = ("faster than" if gain > 1.05 else
                       "slower than" if gain < 0.95 else "about as fast as")
            line = (f"{name}: fastest in {best.memory_format} ({best.median * 1e3:.2f} ms), "
                    f"{gain:.2f}x the speed of {self.baseline} at its best: {verdict} it")
            if best.memory_format == "channels_last":
                line += ("; deploy it with model.to(memory_format=torch.channels_last) and "
                         "channels_last inputs")
            if gain <= 1.05:
                line += ("; on this machine try round_to=8 ranks, fewer (larger) compressed "
                         "layers, or a larger batch")
            lines.append(line)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "timings": [t.to_dict() for t in self.timings]}

    def __str__(self) -> str:
        rows = [("model", "memory format", "median ms", "speedup (same format)")]
        for t in self.timings:
            rows.append((t.model, t.memory_format, f"{t.median * 1e3:.2f}",
                         f"{self.speedup(t.model, t.memory_format):.2f}x"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _to_format(value: Any, fmt: torch.memory_format) -> Any:
    if isinstance(value, torch.Tensor):
        return value.contiguous(memory_format=fmt) if value.dim() == 4 else value
    if isinstance(value, tuple):
        return tuple(_to_format(v, fmt) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_format(v, fmt) for k, v in value.items()}
    return value


def benchmark(
    model: nn.Module,
    compressed: nn.Module | Mapping[str, nn.Module],
    example_inputs: Any,
    *,
    memory_formats: tuple[str, ...] = ("contiguous", "channels_last"),
    warmup: int = 3,
    repeats: int = 10,
    num_threads: int | None = None,
    baseline_name: str = "original",
    min_run_time: float = 0.0,
) -> SpeedReport:
    """Time ``model`` and ``compressed`` side by side on ``example_inputs``.

    :param model: the reference (uncompressed) model; not modified (copies are timed).
    :param compressed: the compressed model, or ``{name: model}`` for several variants.
    :param example_inputs: a tensor, a tuple of positional arguments or a dict of keyword
        arguments; 4-d tensors are converted to each memory format. Models and inputs
        stay on their device: put both on the GPU to time there.
    :param memory_formats: names from :data:`MEMORY_FORMATS`.
    :param warmup: untimed calls per model and format before timing (oneDNN and cuDNN
        pick and cache kernels on the first calls).
    :param repeats: measurements per model and format; the report keeps every one.
    :param num_threads: torch threads for the measurement (default: the current
        ``torch.get_num_threads()``; restored after).
    :param min_run_time: seconds each measurement runs at least: one
        :meth:`torch.utils.benchmark.Timer.blocked_autorange` call, whose median
        per-call time is one entry of :attr:`Timing.times`. With the default 0 a
        measurement is one untimed call (the Timer's block-size estimate) and one timed
        block (one call for anything slower than ~1 ms).
    :returns: a :class:`SpeedReport` with medians, speedups and :meth:`~SpeedReport.advice`.
    """
    unknown = [f for f in memory_formats if f not in MEMORY_FORMATS]
    if unknown:
        raise ValueError(f"unknown memory format(s) {unknown}; valid: {sorted(MEMORY_FORMATS)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if min_run_time < 0:
        raise ValueError(f"need min_run_time >= 0, got {min_run_time}")
    variants = {baseline_name: model}
    if isinstance(compressed, nn.Module):
        variants["compressed"] = compressed
    else:
        variants.update(compressed)
    threads = torch.get_num_threads()
    n_threads = num_threads if num_threads is not None else threads
    runs = []  # (name, format name, model copy, inputs, timer)
    for fname in memory_formats:
        fmt = MEMORY_FORMATS[fname]
        inputs = _to_format(example_inputs, fmt)
        for name, m in variants.items():
            work = copy.deepcopy(m).eval().to(memory_format=fmt)
            timer = Timer(stmt="run_model(model, inputs)", num_threads=n_threads,
                          globals={"run_model": run_model, "model": work, "inputs": inputs})
            runs.append((name, fname, work, inputs, timer))
    times: dict[tuple[str, str], list[float]] = {(n, f): [] for n, f, *_ in runs}
    torch.set_num_threads(n_threads)
    try:
        with torch.inference_mode():  # grad mode is thread-local: it holds inside the Timer
            for _ in range(warmup):
                for _, _, m, inputs, _ in runs:
                    run_model(m, inputs)
            for i in range(repeats):
                shift = i % len(runs)
                for name, fname, _, _, timer in runs[shift:] + runs[:shift]:
                    measurement = timer.blocked_autorange(min_run_time=min_run_time)
                    times[(name, fname)].append(float(measurement.median))
    finally:
        torch.set_num_threads(threads)
    timings = tuple(Timing(n, f, tuple(ts)) for (n, f), ts in times.items())
    return SpeedReport(timings=timings, baseline=baseline_name)
