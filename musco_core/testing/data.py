"""Planted anisotropic inputs and a conformance check for data-aware decompositions.

:func:`check_data_aware` compresses each test layer twice, once with calibration
statistics (``compress(module, rank, params, data=LayerData(...))``) and once
without (``compress(module, rank, plain_params)``), and checks that the data-aware
result is no worse in *output* error on inputs whose covariance is strongly
anisotropic, the case where fitting the data matters::

    from musco_core.testing import check_data_aware

    check_data_aware(MySVD(), MySVD.Params(whiten=True), MySVD.Params(whiten=False))
"""

from __future__ import annotations

import math
from typing import Any

import torch

from musco_core.calibration import LayerData
from musco_core.registry import Registry, default_registry
from musco_core.errors import UnsupportedLayerError
from musco_core.strategies import Decomposition, LayerBatch
from musco_core.testing.checks import default_ranks, one_thread
from musco_core.testing.strategies import ConvConfig, LinearConfig

__all__ = ["DATA_LAYERS", "anisotropic_inputs", "check_data_aware"]

#: Layers :func:`check_data_aware` uses by default: Linear layers wide and tall, with and
#: without bias, 1x1 convs (one strided) and a padded 3x3 conv. ``batch`` and
#: ``input_size`` of the convs give a few hundred input rows, more than the channels.
DATA_LAYERS: dict[str, ConvConfig | LinearConfig] = {
    "linear": LinearConfig(12, 9, bias=True),
    "linear_wide_nobias": LinearConfig(8, 14, bias=False),
    "conv1x1": ConvConfig(10, 8, (1, 1), input_size=(6, 6), batch=4),
    "conv1x1_stride": ConvConfig(8, 10, (1, 1), stride=(2, 2), input_size=(8, 8), batch=8),
    "conv3x3": ConvConfig(8, 10, (3, 3), padding=(1, 1), input_size=(8, 8), batch=4),
}


def anisotropic_inputs(n: int, d: int, *, seed: int, condition: float = 100.0) -> torch.Tensor:
    """``n`` rows of ``d`` features whose covariance has condition number ``condition``.

    Rows are ``z diag(s) Q^T`` with ``z`` standard normal, ``Q`` a random rotation
    (so the principal axes are not the coordinate axes) and variances ``s_i^2``
    spaced geometrically from 1 down to ``1 / condition``. Float64, drawn from
    ``seed`` alone.
    """
    if not condition >= 1:
        raise ValueError(f"condition must be >= 1, got {condition!r}")
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a uniformly random rotation
    exponents = torch.linspace(0.0, 1.0, d, dtype=torch.float64) if d > 1 else torch.zeros(1)
    scales = condition ** (-0.5 * exponents.to(torch.float64))
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (z * scales) @ q.T


def _shift(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows as an upstream change would leave them: mixed a little, plus some noise."""
    n, d = rows.shape
    g = torch.Generator().manual_seed(int(seed) + 7919)
    mix = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g,
                                                                 dtype=torch.float64) / math.sqrt(d)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64) * rows.std(dim=0)
    return rows @ mix + 0.1 * noise


def _inputs(config, seed: int, condition: float, shifted: bool):
    """(original, current) layer inputs with anisotropic feature/channel vectors."""
    if isinstance(config, LinearConfig):
        n = 4 * config.in_features + 8
        x = anisotropic_inputs(n, config.in_features, seed=seed, condition=condition)
        return x, (_shift(x, seed) if shifted else x)
    c = config.in_channels
    b, (h, w) = config.batch, config.input_size
    rows = anisotropic_inputs(b * h * w, c, seed=seed, condition=condition)
    cur = _shift(rows, seed) if shifted else rows

    def image(r: torch.Tensor) -> torch.Tensor:
        return r.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    return image(rows), image(cur)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(torch.linalg.vector_norm(want)) or 1.0
    return float(torch.linalg.vector_norm(got - want)) / scale


@one_thread
def check_data_aware(decomposition: Decomposition, params: Any = None, plain_params: Any = None,
                     *, layers: dict | None = None, shifted: bool = True,
                     condition: float = 100.0, seed: int = 0, rtol: float = 1e-6,
                     atol: float = 1e-9, registry: Registry | None = None) -> None:
    """A data-aware decomposition is no worse than the plain one in output error.

    For every layer of :data:`DATA_LAYERS` (or ``layers=``, a dict of
    :class:`LinearConfig` / :class:`ConvConfig`) that the decomposition accepts
    and at ranks 1, about half and full:

    1. inputs ``X`` are drawn with :func:`anisotropic_inputs` (channel vectors for
       convs, i.i.d. over positions); with ``shifted=True`` the layer "now" sees
       ``X'`` = ``X`` mixed by a random near-identity matrix plus noise, as after
       an upstream layer was compressed, else ``X' = X``;
    2. ``LayerData`` is built from the rows of :meth:`Decomposition.input_rows` by
       the registered statistics ``needs(params)`` names (first-party:
       ``input_gram = X'^T X'``, ``cross_moment = X'^T X``, ``target_gram = X^T X``);
    3. ``compress(module, rank, params, data=data)`` and
       ``compress(module, rank, plain_params)`` are run, both modules are fed
       ``X'``, and their relative error against the original layer's output on
       ``X`` is compared: the data-aware one must satisfy
       ``e_data <= e_plain (1 + rtol) + atol``.

    ``needs(params)`` must be non-empty (else the engine would never pass data)
    and name only statistics registered in ``registry`` (default: the default one). ``params``/``plain_params`` default to
    ``decomposition.Params()``. Pass ``shifted=False`` for a decomposition that
    fits only ``gram`` and ignores ``cross``. All failures are collected and
    raised together as one :class:`AssertionError`.
    """
    params = params if params is not None else decomposition.Params()
    plain_params = plain_params if plain_params is not None else decomposition.Params()
    needs = frozenset(decomposition.needs(params))
    assert needs, (f"{decomposition.name}: needs(params) is empty for {params!r}, so the "
                   f"engine would never pass data; return e.g. frozenset({{'input_gram'}})")
    table = (registry or default_registry()).entries["statistics"]
    unknown = needs - set(table)
    assert not unknown, (f"{decomposition.name}: needs(params) names unknown statistics "
                         f"{sorted(unknown)}; registered: {sorted(table)}")
    statistics = {n: table[n].strategy for n in needs}
    failures: list[str] = []
    tested = 0
    for i, (name, config) in enumerate((layers or DATA_LAYERS).items()):
        module = config.module(seed=seed + i)
        try:
            decomposition.check(name, module)
        except UnsupportedLayerError:
            continue
        x, x_cur = _inputs(config, seed + 100 + i, condition, shifted)
        rows = decomposition.input_rows(module, x).detach().to(torch.float64)
        rows_cur = decomposition.input_rows(module, x_cur).detach().to(torch.float64)
        batch = LayerBatch(name=name, index=0, rows=rows_cur, original_rows=rows, module=module)
        data = LayerData({n: st.result(st.update(None, batch), rows.shape[0])
                          for n, st in statistics.items()}, rows=rows.shape[0])
        with torch.no_grad():
            reference = module(x)
        for rank in default_ranks(decomposition, module):
            tested += 1
            where = f"{decomposition.name} on {name!r} at rank {rank!r}"
            try:
                fitted, _ = decomposition.compress(module, rank, params, data=data)
                plain, _ = decomposition.compress(module, rank, plain_params)
                with torch.no_grad():
                    e_data = _relative(fitted(x_cur), reference)
                    e_plain = _relative(plain(x_cur), reference)
            except Exception as exc:  # noqa: BLE001 - reported with the layer and rank
                failures.append(f"{where}: {type(exc).__name__}: {exc}")
                continue
            if not math.isfinite(e_data) or e_data > e_plain * (1 + rtol) + atol:
                failures.append(f"{where}: output error with data {e_data:.4g} > without "
                                f"{e_plain:.4g}")
    assert tested, (f"{decomposition.name} accepts none of the test layers "
                    f"({', '.join(layers or DATA_LAYERS)}); pass layers=")
    assert not failures, ("data-aware compression is worse than plain:\n  "
                          + "\n  ".join(failures))
