"""Calibration data: the batch stream, the paired pass, and per-layer statistics by name."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from musco_core.errors import CalibrationError, CompressionError
from musco_core._util import first_tensor
from musco_core.stats import eval_mode, run_model
from musco_core.strategies import LayerBatch, Statistic, input_rows  # noqa: F401 (re-export)

class LayerData(Mapping):
    """The calibration statistics of one layer, by name (``data["input_gram"]``).

    Only the statistics the layer's strategies named in ``needs()`` are there; each
    is what its :class:`musco_core.Statistic` plugin returned. ``rows`` is how many
    input rows were summed. The first-party ones (all d x d, float64), with ``X'``
    the rows the layer sees in the model as it is now and ``X`` the rows the
    *original* layer saw on the same batches:

    - ``"input_gram"``  ``G = X'^T X'`` (also :attr:`gram`)
    - ``"cross_moment"`` ``C = X'^T X``, equal to ``G`` while nothing upstream changed
      (also :attr:`cross`)
    - ``"target_gram"`` ``T = X^T X`` (also :attr:`target_gram`)

    The layer's original output on the original inputs is ``X W^T``; a factorized
    ``W'`` fed with what it really sees gives ``X' W'^T``. Its squared output error
    is ``tr(W T W^T) - 2 tr(W' C W^T) + tr(W' G W'^T)``, minimal over all ``W'`` at
    ``W' = W C^T G^{-1}``.
    """

    def __init__(self, values: Mapping[str, Any] | None = None, *, rows: int = 0,
                 gram: Any = None, cross: Any = None, target_gram: Any = None):
        data = dict(values or {})
        for key, value in (("input_gram", gram), ("cross_moment", cross),
                           ("target_gram", target_gram)):
            if value is not None:
                data[key] = value
        self._values = data
        self.rows = int(rows)

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(
                f"statistic {name!r} was not collected for this layer (collected: "
                f"{', '.join(sorted(self._values)) or 'none'}); name it in the strategy's "
                "needs()") from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"LayerData({sorted(self._values)}, rows={self.rows})"

    @property
    def gram(self) -> torch.Tensor:
        return self["input_gram"]

    @property
    def cross(self) -> torch.Tensor:
        return self["cross_moment"]

    @property
    def target_gram(self) -> torch.Tensor:
        return self["target_gram"]

    @property
    def shifted(self) -> bool:
        """Whether the inputs differ from the original ones (something upstream changed)."""
        return not torch.equal(self.gram, self.cross)


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    t = first_tensor(list(batch.values()) if isinstance(batch, dict) else batch)
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

    Anything else (a single tensor or dict, a generator or other one-shot iterator,
    a path, a non-iterable) is a :class:`CalibrationError` saying what was given. An
    exception raised while reading a batch (a DataLoader worker error) becomes a
    :class:`CalibrationError` naming the batch and, while :attr:`step` is set, the
    step, with the original chained.
    """

    VALID = "an iterable of batches (a list of tensors, a DataLoader)"

    def __init__(self, batches: Any, *, max_batches: int | None = None,
                 max_samples: int | None = None, device: torch.device | None = None):
        if isinstance(batches, (torch.Tensor, dict)):
            raise CalibrationError(
                f"calibration must be {self.VALID}; got a single {type(batches).__name__}: "
                "wrap it in a list, [batch]"
            )
        if isinstance(batches, (str, bytes, bytearray, os.PathLike)):
            raise CalibrationError(
                f"calibration must be {self.VALID}; got a {type(batches).__name__} "
                f"({_short(batches)}), which is not data: load the batches and pass them"
            )
        try:
            iterator = iter(batches)
        except TypeError:
            raise CalibrationError(
                f"calibration must be {self.VALID}, got {type(batches).__name__}"
            ) from None
        if iterator is batches:
            raise CalibrationError(
                f"calibration must be re-iterable (a list, a tuple or a DataLoader), but a "
                f"{type(batches).__name__} can be consumed only once and the engine reads the "
                "data at every step; pass list(...) of it instead"
            )
        self.batches = batches
        self.max_batches = max_batches
        self.max_samples = max_samples
        self.device = device
        #: The step reading the data (set by the engine during a step), for error messages.
        self.step: int | None = None

    def __iter__(self):
        seen = 0
        index = 0
        try:
            iterator = iter(self.batches)
        except Exception as exc:
            raise self._source_error(index, exc) from exc
        while self.max_batches is None or index < self.max_batches:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as exc:  # the user's data source: a DataLoader worker, a reader
                raise self._source_error(index, exc) from exc
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
            index += 1

    def _source_error(self, index: int, exc: Exception) -> CalibrationError:
        where = f" in step {self.step}" if self.step is not None else ""
        after = ("; the step was not applied, the model is unchanged"
                 if self.step is not None else "")
        return CalibrationError(
            f"calibration batch {index} could not be read{where}: the data source raised "
            f"{type(exc).__name__}: {exc}{after}", step=self.step, batch=index)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
                run_batch(original, batch, batch_index, "the original model")
                run_batch(current, batch, batch_index, "the model")
                count += 1
    finally:
        for h in handles:
            h.remove()
        kept.clear()
    return count


def run_batch(model: nn.Module, batch: Any, index: int, what: str) -> Any:
    """Run ``model`` on calibration batch ``index``; a batch that does not fit is a
    :class:`CompressionError` naming ``what`` and the batch."""
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


def collect_layer_data(original: nn.Module, current: nn.Module, data: Iterable[Any],
                       layers: Mapping[str, tuple[nn.Module, Any, Mapping[str, Statistic]]],
                       ) -> dict[str, LayerData]:
    """Stream the named statistics of ``layers`` (name -> (module, decomposition, statistics)).

    One paired pass (:func:`paired_pass`); each call of a layer is cut into float64
    rows by its decomposition's ``input_rows`` and folded into each of its
    :class:`musco_core.Statistic` s. Non-finite inputs raise
    :class:`CompressionError` naming the layer and batch.
    """
    states: dict[str, dict[str, Any]] = {}
    rows_seen: dict[str, int] = {}

    def on_pair(name, index, args, out, args_o, _out_o):
        module, decomposition, statistics = layers[name]
        x, x_o = first_tensor(args), first_tensor(args_o)
        if x is None or x_o is None:
            raise CompressionError(f"layer {name!r} got no tensor input on calibration batch "
                                   f"{index}", layer=name)
        rows = decomposition.input_rows(module, x).to(torch.float64)
        rows_o = decomposition.input_rows(module, x_o).to(torch.float64)
        if not (torch.isfinite(rows).all() and torch.isfinite(rows_o).all()):
            raise CompressionError(
                f"layer {name!r}: its inputs on calibration batch {index} contain NaN or Inf; "
                "check the calibration data and the layers before it", layer=name)
        batch = LayerBatch(name=name, index=index, rows=rows, original_rows=rows_o,
                           module=module, output=out)
        state = states.setdefault(name, dict.fromkeys(statistics))
        for key, statistic in statistics.items():
            state[key] = statistic.update(state[key], batch)
        rows_seen[name] = rows_seen.get(name, 0) + rows.shape[0]

    count = paired_pass(original, current, data, {n: m for n, (m, _, _) in layers.items()},
                        on_pair)
    if count == 0:
        step = getattr(data, "step", None)
        where = f" in step {step}" if step is not None else ""
        raise CalibrationError(f"the calibration data yielded no batch{where}; it must give "
                               "the same batches on every pass (a list or a DataLoader)",
                               step=step)
    missing = [n for n in layers if n not in states]
    if missing:
        raise CompressionError(
            f"layer {missing[0]!r} did not run on the calibration data, so its statistics "
            "are unknown; pass calibration batches that reach it", layer=missing[0])
    return {n: LayerData({k: layers[n][2][k].result(v, rows_seen[n]) for k, v in state.items()},
                         rows=rows_seen[n])
            for n, state in states.items()}
