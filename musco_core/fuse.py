"""Fold BatchNorm into the conv or linear layer before it, for inference, in plain and factorized layers.

In eval mode a BatchNorm is a per-channel affine map ``y = a * x + b``, and so is the
bias of the conv or linear layer that feeds it: the two fold into one layer exactly
(up to float rounding). A factorized layer (``SVDConv1x1``, ``Tucker2Conv2d``, CP) ends
in a conv too (``second`` / ``last``), so a BatchNorm after it folds into that last
conv and the factorized layer keeps its structure::

    from musco_core.fuse import fuse_for_inference

    model.eval()
    fused = fuse_for_inference(model)      # a fused copy; the model is not changed

Benchmarks compare fused original against fused compressed, so that BatchNorm passes,
which the original's convs absorb and a factorized layer would otherwise keep, do not
flatter the speedup.

**How pairs are found.** The model is traced with :func:`torch.fx.symbolic_trace`
(which traces *into* factorized modules, down to their convs): a BatchNorm call whose
only input is a conv or linear call, which has no other user, and where both modules are
called only once, is a pair. The folding itself is PyTorch's
:func:`torch.nn.utils.fusion.fuse_conv_bn_eval` /
:func:`~torch.nn.utils.fusion.fuse_linear_bn_eval`.
The fused layer replaces the conv at its dotted name, and the BatchNorm becomes
:class:`torch.nn.Identity`, so the model keeps its class and its other module names
(its ``state_dict`` loses the BatchNorm entries). If the model cannot be traced
(data-dependent control flow), children of every :class:`torch.nn.Sequential` are scanned
instead: a conv, linear or factorized layer followed by a BatchNorm is a pair, the last
conv of a factorized layer being found by tracing that layer alone.

Linear + ``BatchNorm1d`` is folded on the assumption, as in :mod:`torch.ao.quantization`,
that the BatchNorm normalises the linear layer's features (2-D ``(N, features)``
inputs). Forward hooks on a folded BatchNorm are dropped with it.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

#: BatchNorm class matching each conv dimensionality (the Linear case takes BatchNorm1d).
_BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
           nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d,
           nn.ConvTranspose3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}


def _fusable(layer: nn.Module | None, bn: nn.Module | None) -> bool:
    if layer is None or bn is None or type(layer) not in _BN_FOR:
        return False
    if type(bn) is not _BN_FOR[type(layer)] or bn.running_mean is None:
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return out == bn.num_features


def _training(model: nn.Module) -> list[str]:
    return [name or "(the model)" for name, m in model.named_modules() if m.training]


def _pairs_traced(model: nn.Module) -> list[tuple[str, str]]:
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        if calls[prev.target] != 1 or calls[node.target] != 1:
            continue
        if _fusable(modules.get(prev.target), modules.get(node.target)):
            pairs.append((prev.target, node.target))
    return pairs


def last_layer(module: nn.Module) -> str | None:
    """Dotted name (inside ``module``) of the conv or linear layer whose output is
    ``module``'s output, found by tracing ``module`` alone; ``None`` if there is none
    or ``module`` cannot be traced. For a plain conv or linear layer: ``""``."""
    if type(module) in _BN_FOR:
        return ""
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - untraceable: no answer
        return None
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1:
        return None
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    if calls[node.target] != 1 or type(module.get_submodule(node.target)) not in _BN_FOR:
        return None
    return node.target


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            inner = last_layer(a) if type(a) in _BN_FOR or hasattr(a, "musco_decomposition") \
                else None
            if inner is None:
                continue
            dot = f"{prefix}." if prefix else ""
            layer_name = f"{dot}{a_name}" + (f".{inner}" if inner else "")
            if _fusable(model.get_submodule(layer_name), b):
                pairs.append((layer_name, f"{dot}{b_name}"))
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` dotted names that :func:`fuse_for_inference` would fold."""
    try:
        return _pairs_traced(model)
    except Exception:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        return _pairs_sequential(model)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fuse_for_inference(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv or linear layer into it.

    :param model: in eval mode (``model.eval()``): a training-mode BatchNorm normalises
        with batch statistics, which no fixed weight can reproduce.
    :param inplace: mutate and return ``model`` itself; by default a deep copy is fused
        and returned and ``model`` is left unchanged.
    :returns: the fused model, of the same class, with each folded BatchNorm replaced by
        :class:`torch.nn.Identity`. Outputs equal the original's up to float rounding.
    :raises ValueError: if any module of ``model`` is in training mode.
    """
    training = _training(model)
    if training:
        shown = ", ".join(repr(n) for n in training[:5]) + (" ..." if len(training) > 5 else "")
        raise ValueError(
            f"fuse_for_inference: the model is in training mode ({len(training)} module(s) "
            f"with training=True: {shown}); folding BatchNorm is exact only with its running "
            f"statistics; call model.eval() first"
        )
    pairs = conv_bn_pairs(model)
    work = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for layer_name, bn_name in pairs:
            layer, bn = work.get_submodule(layer_name), work.get_submodule(bn_name)
            if isinstance(layer, nn.Linear):
                fused = fuse_linear_bn_eval(layer, bn)
            else:
                transpose = isinstance(layer, nn.modules.conv._ConvTransposeNd)
                fused = fuse_conv_bn_eval(layer, bn, transpose=transpose)
            _set(work, layer_name, fused)
            _set(work, bn_name, nn.Identity())
    return work
