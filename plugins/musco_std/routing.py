"""One decomposition name for more layer types: a decomposition that hands layers to others."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from musco_core import Decomposition, LayerStats, UnsupportedLayerError


class Routed(Decomposition):
    """``base`` under its own name, also handling the layers that ``extras`` accept.

    Each module-level call (``check``, ``full_rank``, ``param_count``,
    ``flop_count``, ``weight``, ``build``, ``compress`` ...) goes to the first of
    ``extras`` whose :meth:`~musco_core.Decomposition.check` accepts the module,
    else to ``base``. The pure math (``decompose``, ``reconstruct``) is ``base``'s:
    an extra must factorize the same kind of weight (``svd1d`` gives ``svd`` an
    (out, in) matrix, ``tucker2_1d`` gives ``tucker2`` an (out, in, k, 1) tensor),
    take the same rank shape, and accept ``base``'s ``Params``.

    So ``Routed(SVD(), SVD1d(), SVDHFConv1D())`` is an ``svd`` that also factorizes
    kernel-1 ``nn.Conv1d`` and GPT-2's ``Conv1D``. Calibration statistics
    (``data=``) go to ``base`` only; extras compress without them.
    """

    def __init__(self, base: Decomposition, *extras: Decomposition):
        self.base = base
        self.extras = extras
        self.name = base.name
        self.summary = base.summary
        self.Params = base.Params
        self.module_types = tuple(base.module_types) + tuple(
            t for e in extras for t in e.module_types if t not in base.module_types)

    def route(self, module: nn.Module) -> Decomposition:
        """The decomposition that handles ``module``: the first extra accepting it, else ``base``."""
        for extra in self.extras:
            try:
                extra.check("", module)
            except UnsupportedLayerError:
                continue
            return extra
        return self.base

    def check(self, name: str, module: nn.Module) -> None:
        """Accept what ``base`` or an extra accepts; otherwise raise the most specific reason.

        That is the reason of an extra whose module types include ``module``'s (a
        grouped ``Conv1d`` gets ``svd1d``'s message about groups), else ``base``'s.
        """
        try:
            self.base.check(name, module)
            return
        except UnsupportedLayerError as base_error:
            for extra in self.extras:
                try:
                    extra.check(name, module)
                    return
                except UnsupportedLayerError as exc:
                    if extra.module_types and isinstance(module, extra.module_types):
                        raise exc from None
            raise base_error from None

    # -- everything that takes a module goes to its route ---------------------------------

    def full_rank(self, module):
        return self.route(module).full_rank(module)

    def param_count(self, module, rank):
        return self.route(module).param_count(module, rank)

    def flop_count(self, module, rank, stats: LayerStats):
        return self.route(module).flop_count(module, rank, stats)

    def rank_for_param_count(self, module, budget):
        return self.route(module).rank_for_param_count(module, budget)

    def rank_for_flop_count(self, module, budget, stats: LayerStats):
        return self.route(module).rank_for_flop_count(module, budget, stats)

    def rank_matrices(self, module) -> list[torch.Tensor]:
        return self.route(module).rank_matrices(module)

    def data_rank_matrices(self, module, data, params):
        target = self.route(module)
        if target is self.base:
            return target.data_rank_matrices(module, data, params)
        return target.rank_matrices(module)

    def validate_rank(self, module, rank):
        return self.route(module).validate_rank(module, rank)

    def input_rows(self, module, x):
        return self.route(module).input_rows(module, x)

    def weight(self, module):
        return self.route(module).weight(module)

    def build(self, module, factors):
        return self.route(module).build(module, factors)

    def skeleton(self, module, rank, params: Any = None):
        return self.route(module).skeleton(module, rank, params)

    def compress(self, module, rank, params: Any, data: Any = None):
        target = self.route(module)
        if target is self.base and data is not None:
            return target.compress(module, rank, params, data=data)
        return target.compress(module, rank, params)

    def compress_ranks(self, module, ranks, params: Any, data: Any = None):
        target = self.route(module)
        if target is self.base:
            return target.compress_ranks(module, ranks, params, data=data)
        return (target.compress(module, rank, params) for rank in ranks)

    # -- what does not depend on a module is base's --------------------------------------

    def needs(self, params):
        return self.base.needs(params)

    def requires_calibration(self, params):
        return self.base.requires_calibration(params)

    def decompose(self, weight, rank, params: Any = None):
        return self.base.decompose(weight, rank, params)

    def reconstruct(self, factors):
        return self.base.reconstruct(factors)
