"""Per-layer statistics from one forward pass: shapes, parameters and FLOPs (and their coverage)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from musco_core._util import first_tensor


@attrs.frozen
class LayerStats:
    """What one forward pass of the example inputs tells about a layer.

    ``flops`` are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
    (a multiply-add is two FLOPs) for the whole example batch, summed over all
    calls of the layer, plus what it misses in fused recurrent and attention layers (see
    :class:`FlopCounter`). ``calls`` is how often the layer ran in that pass.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    flops: int
    calls: int = 1

    @property
    def positions(self) -> int:
        """Number of output vectors per call: batch x tokens for Linear, batch x H x W for conv."""
        channels = _out_channels(self.output_shape)
        numel = 1
        for s in self.output_shape:
            numel *= s
        return numel // channels if channels else 0


def _out_channels(shape: tuple[int, ...]) -> int:
    # Conv outputs are (N, C, H, W); Linear outputs are (..., features).
    return shape[1] if len(shape) == 4 else shape[-1]


def param_count(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for a measurement pass, then restore every submodule's mode.

    Measuring must not change the model: in train mode BatchNorm would update its
    running statistics and dropout would draw random masks.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def probe_module(module: nn.Module, input_shape: tuple[int, ...],
                 formulas: Formulas = ()) -> tuple[int, tuple[int, ...]]:
    """Run ``module`` on a zero input of ``input_shape``; return (FLOPs, output shape).

    FLOPs are counted by :class:`FlopCounter` (``FlopCounterMode`` plus the
    recurrent layers it misses). The
    pass runs under ``torch.no_grad`` and does not change the module.
    """
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(input_shape, device=device, dtype=dtype)
    counter = FlopCounter(module, formulas)
    with torch.no_grad(), eval_mode(module), counter:
        y = module(x)
    out = first_tensor(y)
    return counter.total(), tuple(out.shape) if out is not None else ()


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on example inputs: a tensor, a tuple of arguments or a dict of keywords."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def collect_stats(
    model: nn.Module, example_inputs: Any, names: Iterable[str], formulas: Formulas = ()
) -> dict[str, LayerStats]:
    """Run ``model`` once on ``example_inputs`` and return :class:`LayerStats` for ``names``.

    ``example_inputs`` is a tensor, a tuple of positional arguments, or a dict of
    keyword arguments. Layers that did not run in the pass are left out of the
    result. The pass runs in eval mode without gradients, so the model (BatchNorm
    statistics included) is not changed; each module's train/eval mode is restored.
    """
    wanted = set(names)
    seen: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], int]]] = {}
    started: dict[str, list[int]] = {}
    counter = FlopCounter(model, formulas)
    handles = []

    # FLOPs of one call = the counter's total after the call minus before it, so every
    # layer is measured in place, with the inputs it really gets (integer indices for an
    # embedding, several arguments for attention): nothing is re-run on made-up inputs.
    def make_hooks(layer_name: str):
        def pre_hook(_module, _args):
            started.setdefault(layer_name, []).append(counter.total())

        def hook(_module, args, output):
            flops = counter.total() - started[layer_name].pop()
            x = first_tensor(args)
            y = first_tensor(output)
            if x is not None and y is not None:
                seen.setdefault(layer_name, []).append((tuple(x.shape), tuple(y.shape), flops))

        return pre_hook, hook

    for name, module in model.named_modules():
        if name in wanted:
            pre_hook, hook = make_hooks(name)
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model), counter:
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()

    modules = dict(model.named_modules())
    stats = {}
    for name, calls in seen.items():
        in_shape, out_shape, _ = calls[0]
        stats[name] = LayerStats(
            input_shape=in_shape,
            output_shape=out_shape,
            params=param_count(modules[name]),
            flops=int(sum(c[2] for c in calls)),
            calls=len(calls),
        )
    return stats


# -- FLOPs that FlopCounterMode misses (fused recurrent layers, attention ...) ----------------

#: ``((module types), formula(module, args, kwargs) -> FLOPs)`` pairs: the registered
#: :class:`musco_core.FlopFormula` plugins (first-party: RNNs, attention).
Formulas = Sequence[tuple[Any, Callable[..., int]]]


class FlopCounter:
    """``FlopCounterMode`` plus the FLOPs it misses in fused layers (a context manager).

    Every layer inside ``model`` of a type one of ``formulas`` covers is watched
    (first-party, in ``musco_std.flop_formulas``: ``nn.LSTM`` / ``nn.GRU`` /
    ``nn.RNN``, one fused ``aten::lstm`` on CPU, and ``nn.MultiheadAttention`` on
    its fused fast path). When a call of such a layer adds no FLOPs to the
    counter, its formula's count is added instead.
    :meth:`total` is the running total, so it can be read before and after a
    layer to measure it in place. Other layers the counter reports as 0 (norms,
    embeddings, fused transformer-layer fast paths) stay 0; :func:`coverage`
    lists those that hold parameters.
    """

    def __init__(self, model: nn.Module, formulas: Formulas = ()):
        self.model = model
        self.formulas = tuple(formulas)
        self.mode = FlopCounterMode(display=False)
        #: FLOPs added by formula, on top of what ``FlopCounterMode`` counted.
        self.extra = 0
        self._starts: list[int] = []
        self._handles: list[Any] = []

    def total(self) -> int:
        return int(self.mode.get_total_flops()) + self.extra

    def _pre(self, _module, _args) -> None:
        self._starts.append(self.total())

    def _post_for(self, formula):
        def post(module, args, kwargs, _output) -> None:
            if self.total() == self._starts.pop():
                self.extra += formula(module, args, kwargs)

        return post

    def __enter__(self) -> FlopCounter:
        for m in self.model.modules():
            for kind, formula in self.formulas:
                if isinstance(m, kind):
                    self._handles.append(m.register_forward_pre_hook(self._pre))
                    # First among the forward hooks, so a hook measuring this layer sees them.
                    self._handles.append(m.register_forward_hook(
                        self._post_for(formula), prepend=True, with_kwargs=True))
                    break
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.mode.__exit__(*exc)
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()


def coverage(stats_by_layer: Mapping[str, LayerStats], planned_names: Iterable[str],
             model: nn.Module, *, total_flops: int | None = None) -> dict[str, Any]:
    """The share of the model's FLOPs and parameters that the planned layers hold.

    ``stats_by_layer`` is :func:`collect_stats`' result for the candidate layers,
    ``planned_names`` the layers some rule will compress. Layers nested in another
    measured layer (``attn.out_proj`` inside ``attn``) are counted once, by the
    outer one. The FLOP total is the sum over the outermost measured layers, or
    ``total_flops`` when given (e.g. a :class:`FlopCounter` total of the whole
    model, which includes work outside any parameter-holding layer, such as
    attention products). The parameter total is the model's.

    Returns plain data::

        {"flops_total", "flops_planned", "flops_share",      # share in [0, 1]
         "params_total", "params_planned", "params_share",
         "not_planned": [(name, flops, params), ...],        # outermost layers left out, by FLOPs
         "zero_flops": [name, ...],   # hold parameters but counted 0 FLOPs (norms, embeddings)
         "not_run": [name, ...]}      # planned, but did not run in the measured pass
    """
    names = set(stats_by_layer)

    def outermost(selected: set[str]) -> list[str]:
        out = []
        for n in selected:
            parts = n.split(".")
            if not any(".".join(parts[:i]) in selected for i in range(1, len(parts))):
                out.append(n)
        return sorted(out)

    top = outermost(names)
    planned = set(planned_names)
    planned_top = outermost(planned & names)
    counted = sum(stats_by_layer[n].flops for n in top)
    flops_total = counted if total_flops is None else int(total_flops)
    flops_planned = sum(stats_by_layer[n].flops for n in planned_top)
    params_total = param_count(model)
    params_planned = sum(stats_by_layer[n].params for n in planned_top)

    def inside_planned(n: str) -> bool:
        parts = n.split(".")
        return any(".".join(parts[:i]) in planned for i in range(1, len(parts) + 1))

    left = [(n, stats_by_layer[n].flops, stats_by_layer[n].params)
            for n in top if not inside_planned(n)]
    left.sort(key=lambda t: (-t[1], -t[2], t[0]))
    return {
        "flops_total": flops_total,
        "flops_planned": flops_planned,
        "flops_share": flops_planned / flops_total if flops_total else 0.0,
        "params_total": params_total,
        "params_planned": params_planned,
        "params_share": params_planned / params_total if params_total else 0.0,
        "not_planned": left,
        "zero_flops": sorted(n for n in names
                             if stats_by_layer[n].flops == 0 and stats_by_layer[n].params > 0),
        "not_run": sorted(planned - names),
    }


def model_flops(model: nn.Module, example_inputs: Any, formulas: Formulas = ()) -> int:
    """FLOPs of one forward pass of the whole model on ``example_inputs`` (eval, no grad).

    What ``FlopCounterMode`` counts, plus the plugins' ``formulas`` for the layers it misses.
    """
    counter = FlopCounter(model, formulas)
    with torch.no_grad(), eval_mode(model), counter:
        run_model(model, example_inputs)
    return counter.total()
