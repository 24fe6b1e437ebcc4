"""Calibration data: batches, and the per-layer statistics streamed from them (float64 Grams)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from musco_core.errors import CompressionError
from musco_core.stats import _first_tensor, eval_mode, run_model

#: Statistic names a strategy may list in :meth:`~musco_core.Strategy.needs`.
KNOWN_STATISTICS = frozenset({"input_gram"})


@attrs.frozen(eq=False)
class LayerData:
    """What the calibration data tells about one layer's inputs, accumulated in float64.

    Rows are the layer's input vectors as :meth:`Decomposition.input_rows` cuts them
    (features of a Linear, channel vectors of a conv), ``d`` wide. With ``X'`` the rows
    the layer sees in the model as it is now (earlier layers already compressed) and
    ``X`` the rows the *original* layer saw on the same batches:

    - ``gram``  = ``X'^T X'``  (d x d)
    - ``cross`` = ``X'^T X``   (d x d); equal to ``gram`` while nothing upstream changed
    - ``target_gram`` = ``X^T X`` (d x d)
    - ``rows``: how many rows were summed.

    The layer's original output on the original inputs is ``X W^T``; a factorized
    ``W'`` fed with what it really sees gives ``X' W'^T``. Its squared output error
    is ``tr(W T W^T) - 2 tr(W' C W^T) + tr(W' G W'^T)`` (``G = gram``, ``C = cross``,
    ``T = target_gram``), minimal over all ``W'`` at ``W' = W C^T G^{-1}``.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    target_gram: torch.Tensor
    rows: int

    @property
    def shifted(self) -> bool:
        """Whether the inputs differ from the original ones (something upstream changed)."""
        return not torch.equal(self.gram, self.cross)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer input as rows ``(n, d)``: features (last dim) or channel vectors (dim 1).

    4-D inputs (N, C, H, W) of a module with a ``stride`` (a conv, or a factorized
    conv whose first part has one) are read at the positions a 1x1 conv with that
    stride reads; other inputs are split into their last dimension.
    """
    if x.dim() == 4:
        stride = _stride(module)
        if stride != (1, 1):
            x = x[:, :, :: stride[0], :: stride[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _stride(module: nn.Module) -> tuple[int, int]:
    first = module if isinstance(module, nn.Conv2d) else getattr(module, "first", None)
    if isinstance(first, nn.Conv2d) and tuple(first.kernel_size) == (1, 1):
        return tuple(first.stride)  # type: ignore[return-value]
    return (1, 1)


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    t = _first_tensor(list(batch.values()) if isinstance(batch, dict) else batch)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else 1


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists and dicts recursively)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _cut(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (every tensor with a leading dimension is sliced)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: _cut(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cut(v, n) for v in batch)
    return batch


class CalibrationData:
    """Calibration batches as the engine reads them: capped, on the model's device, re-iterable.

    ``batches`` is any re-iterable of batches, each a tensor, a tuple of positional
    arguments or a dict of keyword arguments (like ``example_inputs``); a
    ``torch.utils.data.DataLoader`` works. Lists from a DataLoader's default
    collation are treated as tuples of positional arguments.
    """

    def __init__(self, batches: Any, *, max_batches: int | None = None,
                 max_samples: int | None = None, device: torch.device | None = None):
        if isinstance(batches, (torch.Tensor, dict)):
            raise TypeError(
                "calibration must be an iterable of batches (a list of tensors, a DataLoader); "
                f"got a single {type(batches).__name__}: wrap it in a list, [batch]"
            )
        try:
            iterator = iter(batches)
        except TypeError:
            raise TypeError(
                f"calibration must be an iterable of batches, got {type(batches).__name__}"
            ) from None
        if iterator is batches:
            raise TypeError(
                f"calibration must be re-iterable (a list, a tuple or a DataLoader), but a "
                f"{type(batches).__name__} can be consumed only once and the engine reads the "
                "data at every step; pass list(...) of it instead"
            )
        self.batches = batches
        self.max_batches = max_batches
        self.max_samples = max_samples
        self.device = device

    def __iter__(self):
        seen = 0
        for i, batch in enumerate(self.batches):
            if self.max_batches is not None and i >= self.max_batches:
                return
            if isinstance(batch, list):
                batch = tuple(batch)
            if self.max_samples is not None:
                left = self.max_samples - seen
                if left <= 0:
                    return
                size = batch_size(batch)
                if size > left:
                    batch = _cut(batch, left)
                seen += min(size, left)
            yield to_device(batch, self.device) if self.device is not None else batch


#: ``on_pair(name, batch_index, args_now, output_now, args_original, output_original)``
PairCallback = Callable[[str, int, tuple, Any, tuple, Any], None]


def paired_pass(original: nn.Module, current: nn.Module, data: CalibrationData,
                modules: Mapping[str, nn.Module], on_pair: PairCallback) -> int:
    """Run the original and the current model side by side on every calibration batch.

    For each batch, ``original`` runs first and the inputs and outputs of its
    submodules named in ``modules`` are kept (for that batch only); then
    ``current`` runs, and each call of ``modules[name]`` (a submodule of
    ``current``) calls ``on_pair`` with what it got and gave and what the original
    layer of that name got and gave on the same batch. Both models run in eval
    mode without gradients; nothing is changed. Returns the number of batches.

    A batch that does not fit a model raises :class:`CompressionError`.
    """
    kept: dict[str, list[tuple[tuple, Any]]] = {}
    handles = []
    batch_index = 0
    count = 0

    def keep(name):
        def hook(_module, args, output):
            kept.setdefault(name, []).append((args, output))
        return hook

    def pair(name):
        def hook(_module, args, output):
            nonlocal batch_index
            calls = kept.get(name)
            if not calls:
                raise CompressionError(
                    f"layer {name!r} ran in the current model but not in the original one on "
                    f"calibration batch {batch_index}", layer=name)
            args_o, out_o = calls.pop(0)
            on_pair(name, batch_index, args, output, args_o, out_o)
        return hook

    for name in modules:
        handles.append(original.get_submodule(name).register_forward_hook(keep(name)))
    for name, module in modules.items():
        handles.append(module.register_forward_hook(pair(name)))
    try:
        with torch.no_grad(), eval_mode(original), eval_mode(current):
            for batch_index, batch in enumerate(data):
                kept.clear()
                _run(original, batch, batch_index, "the original model")
                _run(current, batch, batch_index, "the model")
                count += 1
    finally:
        for h in handles:
            h.remove()
        kept.clear()
    return count


def _run(model: nn.Module, batch: Any, index: int, what: str) -> Any:
    try:
        return run_model(model, batch)
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(
            f"calibration batch {index} does not fit {what}: {type(exc).__name__}: {exc}; "
            "each batch must be what the model's forward takes (a tensor, a tuple of "
            "positional arguments or a dict of keyword arguments), like example_inputs"
        ) from exc


def collect_layer_data(original: nn.Module, current: nn.Module, data: CalibrationData,
                       layers: Mapping[str, tuple[nn.Module, Any]]) -> dict[str, LayerData]:
    """Stream :class:`LayerData` for ``layers`` (name -> (current module, decomposition)).

    One paired pass: only the d x d float64 sums are kept, never activations.
    Non-finite inputs raise :class:`CompressionError` naming the layer and batch.
    """
    sums: dict[str, list] = {}

    def on_pair(name, index, args, _out, args_o, _out_o):
        module, decomposition = layers[name]
        x, x_o = _first_tensor(args), _first_tensor(args_o)
        if x is None or x_o is None:
            raise CompressionError(f"layer {name!r} got no tensor input on calibration batch "
                                   f"{index}", layer=name)
        rows = decomposition.input_rows(module, x).to(torch.float64)
        rows_o = decomposition.input_rows(module, x_o).to(torch.float64)
        if not (torch.isfinite(rows).all() and torch.isfinite(rows_o).all()):
            raise CompressionError(
                f"layer {name!r}: its inputs on calibration batch {index} contain NaN or Inf; "
                "check the calibration data and the layers before it", layer=name)
        if name not in sums:
            d = rows.shape[1]
            z = {"dtype": torch.float64, "device": rows.device}
            sums[name] = [torch.zeros(d, d, **z), torch.zeros(d, d, **z),
                          torch.zeros(d, d, **z), 0]
        acc = sums[name]
        acc[0].addmm_(rows.T, rows)
        acc[1].addmm_(rows.T, rows_o)
        acc[2].addmm_(rows_o.T, rows_o)
        acc[3] += rows.shape[0]

    count = paired_pass(original, current, data, {n: m for n, (m, _) in layers.items()}, on_pair)
    if count == 0:
        raise CompressionError("the calibration data yielded no batch; pass at least one batch")
    missing = [n for n in layers if n not in sums]
    if missing:
        raise CompressionError(
            f"layer {missing[0]!r} did not run on the calibration data, so its statistics "
            "are unknown; pass calibration batches that reach it", layer=missing[0])
    return {n: LayerData(gram=g, cross=c, target_gram=t, rows=r)
            for n, (g, c, t, r) in sums.items()}
