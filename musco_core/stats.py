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
    embeddings, fused transformer-layer fast paths) stay 0; :func:`musco_core.coverage.coverage`
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


def model_flops(model: nn.Module, example_inputs: Any, formulas: Formulas = ()) -> int:
    """FLOPs of one forward pass of the whole model on ``example_inputs`` (eval, no grad).

    What ``FlopCounterMode`` counts, plus the plugins' ``formulas`` for the layers it misses.
    """
    counter = FlopCounter(model, formulas)
    with torch.no_grad(), eval_mode(model), counter:
        run_model(model, example_inputs)
    return counter.total()
