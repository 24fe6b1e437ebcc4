"""A measured per-layer latency model: time a layer (or its factorized version) where it will run.

Fewer FLOPs is not faster (issue 11): a factorized layer adds activation passes and
ragged channel counts, so the only reliable cost is a measurement on the target
device, dtype, memory format and thread count. :class:`LatencyModel` times a module
on a random input of the layer's real input shape and caches the result by the
module's *structure*, so identical layers (the twelve blocks of an encoder, the
repeated bottlenecks of a ResNet) are timed once::

    from musco_std.latency import LatencyModel

    model = LatencyModel(threads=1)
    t_old, t_new = model.speedup(conv, factorized_conv, (1, 64, 56, 56))
    model.save("latency.json")           # reuse on the same machine later
    model = LatencyModel.load("latency.json", threads=1)

**The cache key** (:meth:`LatencyModel.key`) is one string::

    <class name>:<structure digest>|in=<input shape>|<device>|<dtype>|<memory format>|threads=<n>

where the structure digest is a hash of, for the module and every submodule in order:
its class name, the names and shapes of its parameters and buffers, and the attributes
that change the computation of convs and linears (``kernel_size``, ``stride``,
``padding``, ``dilation``, ``groups``, ``padding_mode``, ``in/out_features``,
``in/out_channels``). A rank is part of the structure (it is a weight shape). Weight
*values* are not: timing does not depend on them. ``device`` is ``cpu``, or
``cuda:<device name>`` so a cache moved to another GPU model misses. The dtype and
memory format are those the module is timed in.

**Timing**: a deep copy of the module, in eval mode, moved to the device, dtype and
memory format, is called under :func:`torch.no_grad` on ``torch.randn(input_shape)``;
after ``warmup`` untimed calls, :class:`torch.utils.benchmark.Timer` measures it with
``blocked_autorange(min_run_time)`` (it synchronises CUDA around each block and sets
the thread count) and the median per call is kept. A ``timer`` callable
``(module, x) -> seconds`` replaces the measurement (tests pass a deterministic fake).

**Candidate ranks** (:func:`candidate_ranks`): a small grid of multiples of ``multiple``
(8 by default) around a given rank, so a plan times a few ranks per layer, not every
integer; :func:`fastest_rank_near` picks among them by speed per unit of accuracy cost.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

#: Format tag and version of files written by :meth:`LatencyModel.save`.
FORMAT, VERSION = "musco-latency", 1

#: Module attributes that change what a layer computes (and so its speed).
_STRUCTURAL_ATTRS = ("in_features", "out_features", "in_channels", "out_channels",
                     "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")

_FORMAT_NAMES = {torch.contiguous_format: "contiguous", torch.channels_last: "channels_last",
                 torch.channels_last_3d: "channels_last_3d"}

Timer = Callable[[nn.Module, torch.Tensor], float]


def structure(module: nn.Module) -> list:
    """The structural description hashed into the cache key (plain data, JSON-serialisable)."""
    out = []
    for name, sub in module.named_modules():
        entry: dict[str, Any] = {"name": name, "type": type(sub).__name__}
        for attr in _STRUCTURAL_ATTRS:
            value = getattr(sub, attr, None)
            if isinstance(value, (int, str, tuple)):
                entry[attr] = list(value) if isinstance(value, tuple) else value
        tensors = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
        entry["tensors"] = [[n, list(t.shape)] for n, t in tensors if t is not None]
        out.append(entry)
    return out


def _digest(module: nn.Module) -> str:
    text = json.dumps(structure(module), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def benchmark_timer(min_run_time: float, threads: int) -> Timer:
    """The default timer: median seconds per call by :class:`torch.utils.benchmark.Timer`."""
    from torch.utils import benchmark

    def measure(module: nn.Module, x: torch.Tensor) -> float:
        timer = benchmark.Timer(stmt="module(x)", globals={"module": module, "x": x},
                                num_threads=threads)
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)

    return measure


class LatencyModel:
    """Measured latency of modules on one device, dtype, memory format and thread count.

    :param device: where to time; default: each module's own device.
    :param dtype: the dtype to time in; default: each module's own floating dtype.
    :param memory_format: ``torch.channels_last`` times 4-d inputs and weights in NHWC.
    :param threads: ``torch`` intra-op threads for the measurement (default: the current
        ``torch.get_num_threads()``).
    :param timer: ``(module, x) -> seconds`` replacing the measurement (for tests, or
        another clock); it gets the prepared module and input.
    :param cache: initial ``{key: seconds}`` entries (see :meth:`key`).
    :param min_run_time: seconds :meth:`torch.utils.benchmark.Timer.blocked_autorange`
        spends per measurement.
    :param warmup: untimed calls before a measurement (oneDNN / cuDNN pick kernels then).
    :param batch: time at this batch size instead of the one in the shapes and example
        inputs given (the first dimension of a layer's input shape; for
        :meth:`time_model`, the first dimension of every input tensor that has the
        example's batch size, rows repeated). ``None``: as given.

    ``hits`` and ``misses`` count cache lookups; ``cache`` is the ``{key: seconds}`` dict.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 threads: int | None = None, timer: Timer | None = None,
                 cache: dict[str, float] | None = None, min_run_time: float = 0.05,
                 warmup: int = 2, batch: int | None = None) -> None:
        if memory_format not in _FORMAT_NAMES:
            raise ValueError(f"unknown memory format {memory_format!r}; valid: "
                             f"{', '.join('torch.' + n for n in _FORMAT_NAMES.values())}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)
                                  or batch < 1):
            raise ValueError(f"batch must be an int >= 1 or None, got {batch!r}")
        if min_run_time <= 0 or warmup < 0:
            raise ValueError(f"need min_run_time > 0 and warmup >= 0, got {min_run_time!r} "
                             f"and {warmup!r}")
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.memory_format = memory_format
        self.threads = threads
        self.min_run_time = min_run_time
        self.warmup = warmup
        self.batch = batch
        self.cache: dict[str, float] = dict(cache or {})
        self._timer = timer
        self.hits = self.misses = 0

    def _target(self, module: nn.Module) -> tuple[torch.device, torch.dtype]:
        device, dtype = _module_device_dtype(module)
        return self.device or device, self.dtype or dtype

    def _threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def _shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in input_shape)
        if self.batch is not None and shape:
            shape = (self.batch, *shape[1:])
        return shape

    def key(self, module: nn.Module, input_shape: Sequence[int]) -> str:
        """The cache key of ``module`` timed on inputs of ``input_shape`` (see the module doc)."""
        device, dtype = self._target(module)
        shape = "x".join(str(s) for s in self._shape(input_shape))
        return (f"{type(module).__name__}:{_digest(module)}|in={shape}|{_device_name(device)}|"
                f"{str(dtype).removeprefix('torch.')}|{_FORMAT_NAMES[self.memory_format]}|"
                f"threads={self._threads()}")

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Median seconds of one call of ``module`` on an input of ``input_shape``.

        Cached by :meth:`key`; ``module`` is not modified (a copy is timed).
        """
        key = self.key(module, input_shape)
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        self.misses += 1
        seconds = self._measure(module, self._shape(input_shape))
        self.cache[key] = seconds
        return seconds

    def retime(self, module: nn.Module, input_shape: Sequence[int], repeats: int = 2) -> float:
        """Measure ``module`` ``repeats`` more times; the cached value becomes the median.

        For decisions near a margin (``min_speedup``), where one measurement is
        noisier than the margin. The median is over the cached measurement (if any)
        and the new ones.
        """
        key = self.key(module, input_shape)
        values = [self.cache[key]] if key in self.cache else []
        values += [self._measure(module, self._shape(input_shape)) for _ in range(repeats)]
        self.cache[key] = float(statistics.median(values))
        return self.cache[key]

    def time_model(self, model: nn.Module, example_inputs: Any) -> float:
        """Median seconds of one forward pass of a whole model on ``example_inputs``.

        ``example_inputs`` is what the model takes (a tensor, a tuple of positional
        arguments or a dict of keywords), used as it is (re-batched to ``batch`` when
        the model has one); not cached. Used for model-level latency targets, where the
        layers left as they are count too.
        """
        from musco_core.stats import run_model

        if self.batch is not None:
            example_inputs = rebatch(example_inputs, self.batch)

        class _Whole(nn.Module):
            def forward(self, _unused):
                return run_model(model, example_inputs)

        threads = torch.get_num_threads()
        torch.set_num_threads(self._threads())
        try:
            with torch.no_grad():
                whole, dummy = _Whole(), torch.empty(0)
                from musco_core.stats import eval_mode

                with eval_mode(model):
                    for _ in range(self.warmup):
                        whole(dummy)
                    timer = self._timer or benchmark_timer(self.min_run_time, self._threads())
                    seconds = float(timer(whole, dummy))
        finally:
            torch.set_num_threads(threads)
        return seconds

    def speedup(self, old_module: nn.Module, new_module: nn.Module,
                input_shape: Sequence[int]) -> tuple[float, float]:
        """``(t_old, t_new)``: seconds per call of both modules on the same input shape."""
        return self.time_module(old_module, input_shape), self.time_module(new_module, input_shape)

    def _measure(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        device, dtype = self._target(module)
        work = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
        x = torch.randn(input_shape, device=device, dtype=dtype)
        if (x.dim() == 4 and self.memory_format == torch.channels_last) or (
                x.dim() == 5 and self.memory_format == torch.channels_last_3d):
            work = work.to(memory_format=self.memory_format)
            x = x.contiguous(memory_format=self.memory_format)
        threads = torch.get_num_threads()
        torch.set_num_threads(self._threads())
        try:
            with torch.no_grad():
                for _ in range(self.warmup):
                    work(x)
                timer = self._timer or benchmark_timer(self.min_run_time, self._threads())
                seconds = float(timer(work, x))
        finally:
            torch.set_num_threads(threads)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"the timer returned {seconds!r} seconds for {type(module).__name__}; "
                             "expected a finite number >= 0")
        return seconds

    # -- persistence --------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to a JSON file (atomically: a temporary file, then a rename)."""
        path = Path(path)
        data = {"format": FORMAT, "version": VERSION, "entries": dict(sorted(self.cache.items()))}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> LatencyModel:
        """A model whose cache holds the entries saved in ``path``; ``kwargs`` as for the
        constructor (entries of other devices, dtypes or thread counts simply never match)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a musco latency cache (expected format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"{path}: latency cache version {data.get('version')!r}; "
                             f"this musco reads version {VERSION}")
        entries = {str(k): float(v) for k, v in data["entries"].items()}
        cache = {**entries, **kwargs.pop("cache", {})}
        return cls(cache=cache, **kwargs)


def rebatch(example_inputs: Any, batch: int) -> Any:
    """``example_inputs`` with every tensor of the example's batch size at ``batch`` rows.

    The batch size is the first dimension of the first tensor found; tensors with that
    first dimension get their rows repeated cyclically (``x[arange(batch) % n]``),
    everything else is kept as it is.
    """
    from torch.utils._pytree import tree_leaves, tree_map

    tensors = [t for t in tree_leaves(example_inputs)
               if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not tensors:
        return example_inputs
    n = tensors[0].shape[0]
    if n == batch:
        return example_inputs
    index = torch.arange(batch) % n

    def one(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n:
            return t[index.to(t.device)]
        return t

    return tree_map(one, example_inputs)


# -- candidate ranks and speed-aware rounding ---------------------------------------------


def _grid(full: int, rank: int, multiple: int, span: int) -> list[int]:
    below = (rank // multiple) * multiple
    above = -(-rank // multiple) * multiple
    values = {rank}
    values.update(below - i * multiple for i in range(span))
    values.update(above + i * multiple for i in range(span))
    return sorted(v for v in values if 1 <= v <= full)


def candidate_ranks(full_rank: int | tuple[int, ...], flop_optimal_rank: int | tuple[int, ...],
                    multiple: int = 8, span: int = 2) -> list:
    """A small grid of ranks to time near ``flop_optimal_rank``.

    For an int rank ``r``: ``r`` itself, the ``span`` multiples of ``multiple`` at or
    below it (``floor(r/m)*m``, one ``m`` lower, ...) and the ``span`` at or above it
    (``ceil(r/m)*m``, ...), limited to ``1 .. full_rank``, ascending. With
    ``multiple=8, span=2`` a rank of 100 gives ``[88, 96, 100, 104, 112]``: multiples of 8
    (and among them of 16) are where CPU and GPU kernels run full vector widths. A rank
    that is already a multiple counts as both the nearest lower and upper multiple, so
    ``span=1`` leaves it alone (``[96]`` for 96).

    For a tuple rank every component gets its own grid and candidates are taken
    position by position (the i-th lower, the rank itself, the i-th higher), so the
    shape of the rank is kept: ``(100, 60)`` gives ``(88, 48), (96, 56), (100, 60),
    (104, 64), (112, 72)``.
    """
    if multiple < 1 or span < 0:
        raise ValueError(f"need multiple >= 1 and span >= 0, got {multiple!r} and {span!r}")
    if isinstance(flop_optimal_rank, int):
        if not isinstance(full_rank, int):
            raise ValueError(f"rank {flop_optimal_rank!r} is an int but the full rank "
                             f"{full_rank!r} is not")
        return _grid(full_rank, min(flop_optimal_rank, full_rank), multiple, span)
    full = tuple(full_rank) if not isinstance(full_rank, int) else None
    if full is None or len(full) != len(flop_optimal_rank):
        raise ValueError(f"rank {flop_optimal_rank!r} and full rank {full_rank!r} differ in length")
    out = []
    for step in range(-span, span + 1):
        comp = []
        for f, r in zip(full, flop_optimal_rank):
            r = min(r, f)
            if step < 0:
                v = (r // multiple) * multiple + (step + 1) * multiple
            elif step > 0:
                v = -(-r // multiple) * multiple + (step - 1) * multiple
            else:
                v = r
            comp.append(min(max(v, 1), f))
        out.append(tuple(comp))
    return list(dict.fromkeys(out))


@attrs.frozen
class RankTiming:
    """One timed candidate: its rank, seconds per call and accuracy cost."""

    rank: Any
    seconds: float
    cost: float


@attrs.frozen
class NearestFastRank:
    """What :func:`fastest_rank_near` chose and the table it chose from.

    ``rank`` is the chosen rank; ``candidates`` every timed candidate (ascending);
    ``original_seconds`` the layer as it is.
    """

    rank: Any
    candidates: tuple[RankTiming, ...]
    original_seconds: float

    def speedup(self, rank: Any = None) -> float:
        """Original seconds / seconds of ``rank`` (default: the chosen one)."""
        rank = self.rank if rank is None else rank
        t = next(c.seconds for c in self.candidates if c.rank == rank)
        return self.original_seconds / t if t > 0 else math.inf


#: Accuracy costs below this count as this (a lossless candidate would divide by zero).
MIN_COST = 1e-12


def fastest_rank_near(decomposition: Any, module: nn.Module, stats: Any, rank: Any,
                      model: LatencyModel, accuracy_cost: Callable[[Any], float], *,
                      params: Any = None, multiple: int = 8, span: int = 1,
                      max_cost: float | None = None) -> NearestFastRank:
    """Among ranks near ``rank``, the one with the best speed per unit of accuracy cost.

    Candidates are :func:`candidate_ranks` ``(full, rank, multiple, span)``: with the
    default ``span=1``, the multiple of ``multiple`` just below ``rank``, ``rank`` itself
    and the multiple just above. Each is built with ``decomposition.skeleton`` (the
    structure only; weights do not change timings), timed by ``model`` on
    ``stats.input_shape``, and priced by ``accuracy_cost(rank)`` (for example the
    truncation error ``sum of discarded s_i^2 / sum s_i^2``, or a measured output
    error). The choice maximises

        score(r) = speedup(r) / max(accuracy_cost(r), MIN_COST),
        speedup(r) = t(original) / t(r)

    so moving to a lower rank pays only if it makes the layer faster by a larger factor
    than it makes the cost grow (and a higher rank wins when its cost falls faster than
    its speed): rounding is decided by the measured device, not always downwards as
    ``round_to`` does. Candidates whose cost exceeds ``max_cost`` are dropped (the given
    ``rank`` never is). Ties go to the lower rank.

    Returns a :class:`NearestFastRank` with the chosen rank and the timed table.
    """
    full = decomposition.full_rank(module)
    shape = stats.input_shape
    original = model.time_module(module, shape)
    rows = []
    for r in candidate_ranks(full, rank, multiple, span):
        cost = float(accuracy_cost(r))
        if max_cost is not None and cost > max_cost and r != rank:
            continue
        candidate = decomposition.skeleton(module, r, params)
        rows.append(RankTiming(r, model.time_module(candidate, shape), cost))

    def score(row: RankTiming) -> float:
        speed = original / row.seconds if row.seconds > 0 else math.inf
        return speed / max(row.cost, MIN_COST)

    best = max(rows, key=score)  # max keeps the first (lowest) rank among equals
    return NearestFastRank(rank=best.rank, candidates=tuple(rows), original_seconds=original)



def latency_model(run: Any) -> LatencyModel:
    """The run's shared :class:`LatencyModel` (``run.resources["latency"]``), made on first use.

    ``Compressor(latency=...)`` puts the user's model there; otherwise one is made on
    the model's device, so every cost and gate of a run times with the same cache.
    """
    model = run.resources.get("latency")
    if model is None:
        model = run.resources["latency"] = LatencyModel(device=run.device)
    return model
