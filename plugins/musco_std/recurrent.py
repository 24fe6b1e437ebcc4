"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: truncated SVD of the first layer's input-to-hidden weights."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from musco_core import Decomposition, LayerStats, UnsupportedLayerError
from musco_core.stats import param_count as module_params
from musco_std.flop_formulas import RECURRENT_GATES as GATES
from musco_std.flop_formulas import recurrent_flops
from musco_std.svd import FactorPairSVD, core_of_product


class LowRankInput(nn.Module):
    """A stock recurrent layer fed through a thin projection: ``rnn(proj(x), hx)``.

    ``proj`` is ``nn.Linear(in -> rank, bias=False)``; ``rnn`` is a stock
    ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` whose first layer reads ``rank`` features.
    Since the first layer only ever uses its input through ``W_ih x``, a rank-r
    ``W_ih = B A`` makes this exactly the original layer: ``proj.weight = A`` and
    the first layer's ``weight_ih`` (per direction) are the rows of ``B``. The
    hidden-to-hidden weights, the biases and every later layer are the original ones.

    ``forward`` takes and returns exactly what ``rnn`` does (batch-first or not,
    unbatched, ``PackedSequence``, an optional ``hx``).
    """

    #: Marks a factorized layer for the engine and the ``factorized`` matcher.
    musco_decomposition = "svd_rnn"

    def __init__(self, proj: nn.Linear, rnn: nn.RNNBase):
        super().__init__()
        self.proj = proj
        self.rnn = rnn

    @property
    def rank(self) -> int:
        return self.proj.out_features

    def _project_packed(self, input: PackedSequence) -> PackedSequence:
        return PackedSequence(self.proj(input.data), input.batch_sizes, input.sorted_indices,
                              input.unsorted_indices)


# One forward per layer type, typed as the stock layer's, so that TorchScript can compile
# it; the PackedSequence branch is eager-only (TorchScript skips it).


class LowRankInputLSTM(LowRankInput):
    """:class:`LowRankInput` around an ``nn.LSTM``."""

    def forward(self, input: torch.Tensor, hx: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        if not torch.jit.is_scripting() and isinstance(input, PackedSequence):
            return self.rnn(self._project_packed(input), hx)
        return self.rnn(self.proj(input), hx)


class LowRankInputGRU(LowRankInput):
    """:class:`LowRankInput` around an ``nn.GRU``."""

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None):
        if not torch.jit.is_scripting() and isinstance(input, PackedSequence):
            return self.rnn(self._project_packed(input), hx)
        return self.rnn(self.proj(input), hx)


class LowRankInputRNN(LowRankInput):
    """:class:`LowRankInput` around an ``nn.RNN``."""

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None):
        if not torch.jit.is_scripting() and isinstance(input, PackedSequence):
            return self.rnn(self._project_packed(input), hx)
        return self.rnn(self.proj(input), hx)


_WRAPPERS = {nn.LSTM: LowRankInputLSTM, nn.GRU: LowRankInputGRU, nn.RNN: LowRankInputRNN}


def _suffixes(rnn: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if rnn.bidirectional else ("",)


def _inner(module: nn.Module) -> nn.RNNBase:
    return module.rnn if isinstance(module, LowRankInput) else module


class SVDRecurrent(FactorPairSVD, Decomposition):
    """Truncated SVD of the input-to-hidden weights of a recurrent layer's first layer.

    For ``nn.LSTM`` (4 gates), ``nn.GRU`` (3) and ``nn.RNN`` (1), the first layer's
    ``W_ih`` (``gates * hidden x in``) is factorized as ``B A`` (rank ``r``) and the
    layer rebuilt as :class:`LowRankInput`: ``Linear(in -> r, no bias)`` followed by
    the same recurrent layer reading ``r`` features. For a bidirectional layer the
    two directions' ``W_ih`` are stacked (``2 * gates * hidden x in``) and factorized
    jointly, so one projection serves both.

    **Factorized:** layer 0's input-to-hidden weights only. **Not factorized:** the
    hidden-to-hidden weights ``W_hh`` (they act on the recurrent state, and a
    low-rank ``W_hh`` would need a custom cell), LSTM's projection ``W_hr``, the biases,
    and the input weights of layers 1 and up (they read the previous layer's
    hidden states inside the fused kernel). Pays off when the input is wide
    (``in`` much larger than ``hidden``), as in speech and OCR recognizers.

    The rank is an int in ``1 .. min(in, directions * gates * hidden)``. A
    :class:`LowRankInput` is re-truncated in a later round.

    References
    ----------
    C. Eckart, G. Young, "The approximation of one matrix by another of lower
    rank", Psychometrika 1 (1936).
    """

    name = "svd_rnn"
    summary = "truncated SVD of LSTM/GRU/RNN layer-0 input weights -> Linear(in->r) + RNN(r->h)"
    module_types = (nn.LSTM, nn.GRU, nn.RNN, LowRankInput)

    def check(self, name: str, module: nn.Module) -> None:
        super().check(name, module)
        rnn = _inner(module)
        if type(rnn) not in _WRAPPERS:
            raise UnsupportedLayerError(
                f"layer {name!r}: decomposition {self.name!r} rebuilds stock nn.LSTM, nn.GRU and "
                f"nn.RNN only, got the subclass {type(rnn).__name__}")

    @staticmethod
    def _dims(module: nn.Module) -> tuple[int, int]:
        """(in, rows): the layer's input features and the rows of the stacked layer-0 ``W_ih``."""
        rnn = _inner(module)
        n_in = module.proj.in_features if isinstance(module, LowRankInput) else rnn.input_size
        rows = GATES[rnn.mode] * rnn.hidden_size * (2 if rnn.bidirectional else 1)
        return n_in, rows

    def _sides(self, module: nn.Module) -> tuple[int, int]:
        return self._dims(module)

    def _fixed_params(self, module: nn.Module) -> int:
        """Parameters of the recurrent layer other than layer 0's ``W_ih``."""
        rnn = _inner(module)
        return module_params(rnn) - self._dims(module)[1] * rnn.input_size

    def flop_count(self, module: nn.Module, rank: int, stats: LayerStats) -> int:
        """``2 steps in r`` for the projection plus :func:`musco_std.flop_formulas.recurrent_flops`
        of the recurrent layer reading ``r`` features."""
        n_in, _ = self._dims(module)
        steps = _numel(stats.input_shape) // n_in
        rnn = _inner(module)
        per_call = 2 * steps * n_in * rank + recurrent_flops(rnn, (steps, rank), input_size=rank)
        return per_call * stats.calls

    def weight(self, module: nn.Module) -> torch.Tensor:
        """Layer 0's ``W_ih`` of all directions stacked: (directions * gates * hidden, in)."""
        rnn = _inner(module)
        stacked = torch.cat([getattr(rnn, f"weight_ih_l0{s}") for s in _suffixes(rnn)])
        return stacked @ module.proj.weight if isinstance(module, LowRankInput) else stacked

    def rank_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        """The stacked ``W_ih``; for a :class:`LowRankInput`, the r x r core of its factors."""
        if not isinstance(module, LowRankInput):
            return [self.weight(module).detach()]
        rnn = module.rnn
        b = torch.cat([getattr(rnn, f"weight_ih_l0{s}") for s in _suffixes(rnn)]).detach()
        return [core_of_product(module.proj.weight.detach(), b)]

    def skeleton(self, module: nn.Module, rank: int, params: Any = None) -> nn.Module:
        n_in, rows = self._dims(module)
        ref = _inner(module).weight_ih_l0
        kw = {"device": ref.device, "dtype": ref.dtype}
        return self.build(module, (torch.zeros(rank, n_in, **kw), torch.zeros(rows, rank, **kw)))

    def build(self, module: nn.Module, factors) -> nn.Module:
        first, second = factors
        rank = first.shape[0]
        old = _inner(module)
        kw = {"device": old.weight_ih_l0.device, "dtype": old.weight_ih_l0.dtype}
        options = {"num_layers": old.num_layers, "bias": old.bias, "batch_first": old.batch_first,
                   "dropout": old.dropout, "bidirectional": old.bidirectional, **kw}
        if isinstance(old, nn.LSTM):
            options["proj_size"] = old.proj_size
        if isinstance(old, nn.RNN):
            options["nonlinearity"] = old.nonlinearity
        cls = type(old)
        rnn = cls(rank, old.hidden_size, **options)
        state = dict(old.state_dict())
        for suffix, rows in zip(_suffixes(old), second.chunk(len(_suffixes(old)))):
            state[f"weight_ih_l0{suffix}"] = rows
        rnn.load_state_dict(state)
        proj = nn.Linear(first.shape[1], rank, bias=False, **kw)
        with torch.no_grad():
            proj.weight.copy_(first)
        new = _WRAPPERS[cls](proj, rnn)
        new.train(module.training)
        return new


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
