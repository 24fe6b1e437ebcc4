"""FLOP formulas for layers ``torch.utils.flop_counter`` misses: fused RNNs and attention.

Registered as :class:`musco_core.FlopFormula` plugins like a third party's; the
counter uses one when a call of such a layer added no FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from musco_core import FlopFormula
from musco_core._util import first_tensor

#: Gates per recurrent cell type (``nn.RNNBase.mode``).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def recurrent_flops(module: nn.RNNBase, input_shape: tuple[int, ...], *,
                    input_size: int | None = None) -> int:
    """FLOPs of one call of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on an input of ``input_shape``.

    Counted as :class:`~torch.utils.flop_counter.FlopCounterMode` counts matrix
    products (a multiply-add is two FLOPs; bias adds and elementwise work are not
    counted). With ``g`` gates (LSTM 4, GRU 3, RNN 1), hidden size ``h``, state
    size ``p`` (LSTM's ``proj_size`` if set, else ``h``), ``d`` directions and
    ``s`` time steps summed over the batch (``numel(input) / input_size``, so
    batch-first, unbatched and packed inputs all work)::

        FLOPs = s * d * sum over layers l of [2 g h (in_l + p) + 2 h p (LSTM proj_size only)]

    where ``in_0`` is the input size and ``in_l = d * p`` for ``l >= 1``. Not
    counted: the gate nonlinearities and elementwise products (LSTM about ``9 h``,
    GRU about ``8 h`` per step and direction; under 5% for ``in + h >= 64``). For GRU
    and RNN this equals what ``FlopCounterMode`` counts on CPU; it counts 0 for LSTM
    (one fused ``aten::lstm`` call) and for cuDNN's fused kernels.

    ``input_size`` overrides ``module.input_size`` (used to cost a layer at a new input width).
    """
    gates = RECURRENT_GATES[module.mode]
    h = module.hidden_size
    in0 = module.input_size if input_size is None else input_size
    proj = getattr(module, "proj_size", 0) or 0
    p = proj or h
    d = 2 if module.bidirectional else 1
    numel = 1
    for s in input_shape:
        numel *= s
    steps = numel // in0 if in0 else 0
    per_step = 0
    for layer in range(module.num_layers):
        width = in0 if layer == 0 else d * p
        per_step += 2 * gates * h * (width + p) + (2 * h * proj if proj else 0)
    return steps * d * per_step


def attention_flops(module: nn.MultiheadAttention, query_shape: tuple[int, ...],
                    key_shape: tuple[int, ...]) -> int:
    """FLOPs of one call of an ``nn.MultiheadAttention`` (matrix products, as FlopCounterMode).

    With embedding ``E``, key/value widths ``kdim``/``vdim``, ``L`` query and ``S``
    key positions (times the batch ``N``)::

        FLOPs = 2 N (L E E + S kdim E + S vdim E)   # q, k, v projections
              + 2 N L S E * 2                     # scores q k^T and their weighted sum of v
              + 2 N L E E                         # output projection

    Equal to what ``FlopCounterMode`` counts on the slow path (training, masks);
    in eval mode PyTorch may take a fused fast path (``_native_multi_head_attention``)
    that it counts as 0. Softmax, scaling and biases are not counted.
    """
    e = module.embed_dim
    batch_first = getattr(module, "batch_first", False)

    def split(shape: tuple[int, ...]) -> tuple[int, int]:  # (batch, positions)
        if len(shape) == 2:
            return 1, shape[0]
        return (shape[0], shape[1]) if batch_first else (shape[1], shape[0])

    n, length = split(query_shape)
    _, source = split(key_shape)
    projections = 2 * n * (length * e * e + source * module.kdim * e + source * module.vdim * e)
    return projections + 4 * n * length * source * e + 2 * n * length * e * e


class Recurrent(FlopFormula):
    name = "recurrent"
    summary = "nn.LSTM / nn.GRU / nn.RNN: the matrix products of every gate (recurrent_flops)"
    module_types = (nn.RNNBase,)
    #: The model totals keep what FlopCounterMode counts for these (as before this plugin).
    in_model_total = False

    def flops(self, module, args, kwargs) -> int:
        if module.mode not in RECURRENT_GATES:
            return 0
        x = first_tensor(args) if args else first_tensor(kwargs.get("input"))
        return recurrent_flops(module, tuple(x.shape)) if x is not None else 0


class Attention(FlopFormula):
    name = "multihead_attention"
    summary = "nn.MultiheadAttention on its fused fast path: projections and scores"
    module_types = (nn.MultiheadAttention,)
    in_model_total = False

    def flops(self, module, args, kwargs) -> int:
        names = ("query", "key")
        given = list(args[:2]) + [kwargs.get(k) for k in names[len(args[:2]):]]
        if len(given) < 2 or not all(isinstance(t, torch.Tensor) for t in given):
            return 0
        return attention_flops(module, tuple(given[0].shape), tuple(given[1].shape))


FLOP_FORMULAS = (Recurrent(), Attention())
