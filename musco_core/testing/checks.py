"""Conformance checks any :class:`~musco_core.Decomposition` should pass.

Each ``check_*`` function takes a decomposition and keyword options, runs on
every layer of :data:`DEFAULT_LAYERS` (or ``layers=``) that the decomposition
accepts, and raises :class:`AssertionError` naming the layer and the rank on the
first failure. :func:`check_decomposition` runs them all;
:func:`parametrize_with_checks` turns a list of decompositions into named
pytest cases, in the spirit of scikit-learn's helper of the same name.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musco_core.errors import UnsupportedLayerError
from musco_core.registry import default_registry
from musco_core.stats import LayerStats, param_count, probe_module
from musco_core.strategies import Decomposition, rank_tuple
from musco_core.testing.strategies import ConvConfig, LinearConfig

__all__ = [
    "CHECKS", "DEFAULT_LAYERS", "check_compress_keeps_input", "check_decomposition",
    "check_factorized_module_class", "check_flop_count", "check_forward_equivalence",
    "check_param_count", "check_planted_recovery", "check_rank_for_param_count",
    "check_recompression", "check_reconstruction_reference", "check_supports_some_layer",
    "check_validate_rank", "cp3_reference", "cp4_reference", "parametrize_with_checks",
    "svd_reference", "tucker2_reference",
]

#: Small float64 layers covering what decompositions must get right: bias or not,
#: stride, padding (ints, asymmetric ``'same'``), dilation, non-square kernels.
DEFAULT_LAYERS: dict[str, ConvConfig | LinearConfig] = {
    "linear": LinearConfig(7, 5, bias=True),
    "linear_nobias": LinearConfig(6, 9, bias=False),
    "conv1x1_stride_pad": ConvConfig(6, 8, (1, 1), stride=(2, 2), padding=(1, 1),
                                     input_size=(7, 6)),
    "conv3x3": ConvConfig(5, 7, (3, 3), padding=(1, 1), input_size=(6, 7)),
    "conv3x2_stride_dilation": ConvConfig(4, 6, (3, 2), stride=(2, 1), padding=(1, 0),
                                          dilation=(1, 2), bias=False, input_size=(7, 8)),
    "conv_same_dilated": ConvConfig(6, 5, (3, 3), padding="same", dilation=(2, 2),
                                    input_size=(6, 6)),
    "conv2x4_same_asymmetric": ConvConfig(3, 4, (2, 4), padding="same", input_size=(5, 7)),
}


def _supported(decomposition: Decomposition, layers) -> list[tuple[str, Any, nn.Module]]:
    out = []
    for name, config in (layers or DEFAULT_LAYERS).items():
        module = config.module()
        try:
            decomposition.check(name, module)
        except UnsupportedLayerError:
            continue
        out.append((name, config, module))
    return out


def default_ranks(decomposition: Decomposition, module: nn.Module) -> list:
    """Rank 1, about half the full rank, and the full rank (distinct, in that order).

    Shared with :mod:`musco_core.testing.data` (not in ``__all__``)."""
    full = decomposition.full_rank(module)
    if isinstance(full, int):
        ranks = [1, max(1, full // 2), full]
    else:
        ranks = [tuple(1 for _ in full), tuple(max(1, f // 2) for f in full), tuple(full)]
    return list(dict.fromkeys(ranks))


def _params(decomposition: Decomposition, params: Any) -> Any:
    return params if params is not None else decomposition.Params()


def _reference(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The dense layer's output with its weight replaced by ``weight``."""
    weight = weight.reshape(module.weight.shape)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation,
                    module.groups)


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = float(torch.linalg.vector_norm(want)) or 1.0
    diff = float(torch.linalg.vector_norm(got - want))
    assert diff <= rtol * scale, f"{what}: |y - y_ref| / |y_ref| = {diff / scale:.3g} > {rtol:g}"


def _stats(config, module: nn.Module) -> LayerStats:
    x = config.input()
    flops, out_shape = probe_module(module, tuple(x.shape), default_registry().flop_formulas())
    return LayerStats(tuple(x.shape), out_shape, param_count(module), flops, 1)


# -- the checks -------------------------------------------------------------------------


def one_thread(check):
    """Run ``check`` with one intra-op thread (restored after): the layers are tiny, and
    thread start-up and spinning dominate on small or busy machines. Shared with
    :mod:`musco_core.testing.data` (not in ``__all__``)."""

    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@one_thread
def check_supports_some_layer(decomposition: Decomposition, *, layers=None, **_) -> None:
    """The decomposition accepts at least one of the layers (else nothing is tested)."""
    names = ", ".join(layers or DEFAULT_LAYERS)
    assert _supported(decomposition, layers), (
        f"{decomposition!r} accepts none of the test layers ({names}); pass layers=")


@one_thread
def check_forward_equivalence(decomposition: Decomposition, *, layers=None, params=None,
                              rtol: float = 1e-10, **_) -> None:
    """The built module computes the dense layer with the reconstructed weight (float64)."""
    params = _params(decomposition, params)
    for name, config, module in _supported(decomposition, layers):
        x = config.input()
        for rank in default_ranks(decomposition, module):
            weight = decomposition.weight(module).detach()
            factors = decomposition.decompose(weight, rank, params)
            approx = decomposition.reconstruct(factors)
            built = decomposition.build(module, factors)
            with torch.no_grad():
                _assert_close(built(x), _reference(module, approx, x), rtol,
                              f"{decomposition.name} on {name!r} at rank {rank!r}")


@one_thread
def check_planted_recovery(decomposition: Decomposition, *, layers=None, params=None,
                           planted_rtol: float = 1e-6, plant=None, planted_ranks=None,
                           planted_params=None, **_) -> None:
    """A weight that is exactly of rank ``r`` for this decomposition is recovered at ``r``.

    By default the planted weight is the decomposition's own reconstruction of a
    random layer at ``r`` (so the check needs no knowledge of the structure), at
    ranks 1, about half and full. ``plant(weight_shape, rank, seed) -> weight``
    plants a structure of your own instead (e.g. :func:`cp_weight`), and
    ``planted_ranks(decomposition, module) -> ranks`` chooses the ranks and
    ``planted_params`` the Params of this check only (default ``params``). The layer
    with the planted weight is compressed at ``r``; the relative error reported
    by ``compress`` must be at most ``planted_rtol``. Iterative methods (CP-ALS)
    may need well-conditioned plants, small ranks and a looser tolerance.
    """
    params = _params(decomposition, planted_params if planted_params is not None else params)
    for name, config, module in _supported(decomposition, layers):
        ranks = (planted_ranks or default_ranks)(decomposition, module)
        for seed, rank in enumerate(ranks):
            planted = copy.deepcopy(module)
            if plant is None:
                weight = decomposition.weight(module).detach()
                approx = decomposition.reconstruct(decomposition.decompose(weight, rank, params))
            else:
                approx = plant(tuple(module.weight.shape), rank, seed)
            with torch.no_grad():
                planted.weight.copy_(approx.reshape(planted.weight.shape))
            _, error = decomposition.compress(planted, rank, params)
            assert error <= planted_rtol, (
                f"{decomposition.name} on {name!r}: planted rank {rank!r} recovered with "
                f"relative error {error:.3g} > {planted_rtol:g}")


@one_thread
def check_param_count(decomposition: Decomposition, *, layers=None, params=None, **_) -> None:
    """``param_count`` equals the parameter count of the built module."""
    params = _params(decomposition, params)
    for name, config, module in _supported(decomposition, layers):
        for rank in default_ranks(decomposition, module):
            built, _ = decomposition.compress(module, rank, params)
            want, got = param_count(built), decomposition.param_count(module, rank)
            assert got == want, (f"{decomposition.name} on {name!r} at rank {rank!r}: "
                                 f"param_count says {got}, the built module has {want}")


@one_thread
def check_flop_count(decomposition: Decomposition, *, layers=None, params=None, **_) -> None:
    """``flop_count`` equals what ``FlopCounterMode`` counts for the built module."""
    params = _params(decomposition, params)
    for name, config, module in _supported(decomposition, layers):
        stats = _stats(config, module)
        for rank in default_ranks(decomposition, module):
            built, _ = decomposition.compress(module, rank, params)
            want, _ = probe_module(built, stats.input_shape, default_registry().flop_formulas())
            got = decomposition.flop_count(module, rank, stats)
            assert got == want, (f"{decomposition.name} on {name!r} at rank {rank!r}: "
                                 f"flop_count says {got}, FlopCounterMode counts {want}")


@one_thread
def check_validate_rank(decomposition: Decomposition, *, layers=None, **_) -> None:
    """``validate_rank`` accepts 1 and the full rank, rejects 0 and anything above full."""
    for name, config, module in _supported(decomposition, layers):
        full = rank_tuple(decomposition.full_rank(module))
        shape = (lambda t: t[0]) if isinstance(decomposition.full_rank(module), int) else tuple
        for good in (shape(tuple(1 for _ in full)), shape(full)):
            msg = decomposition.validate_rank(module, good)
            assert msg is None, f"{decomposition.name} on {name!r}: rank {good!r} rejected: {msg}"
        bad = [shape(tuple(0 for _ in full))]
        for i in range(len(full)):
            over = list(full)
            over[i] += 1
            bad.append(shape(tuple(over)))
        for rank in bad:
            assert decomposition.validate_rank(module, rank), (
                f"{decomposition.name} on {name!r}: invalid rank {rank!r} accepted "
                f"(full rank {decomposition.full_rank(module)!r})")


@one_thread
def check_compress_keeps_input(decomposition: Decomposition, *, layers=None, params=None,
                               **_) -> None:
    """``compress`` leaves the input module's parameters, mode and type unchanged."""
    params = _params(decomposition, params)
    for name, config, module in _supported(decomposition, layers):
        module.train(True)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        decomposition.compress(module, default_ranks(decomposition, module)[1], params)
        after = module.state_dict()
        assert module.training, f"{decomposition.name} on {name!r}: compress changed train mode"
        assert before.keys() == after.keys(), f"{decomposition.name} on {name!r}: state changed"
        for k, v in before.items():
            assert torch.equal(v, after[k]), (
                f"{decomposition.name} on {name!r}: compress modified {k!r} of its input")


@one_thread
def check_rank_for_param_count(decomposition: Decomposition, *, layers=None, **_) -> None:
    """``rank_for_param_count`` gives a valid rank within budget, or ``None`` below rank 1."""
    for name, config, module in _supported(decomposition, layers):
        total = param_count(module)
        for rate in (1.0, 1.5, 2.0, 3.0, 5.0, 50.0):
            budget = total / rate
            rank = decomposition.rank_for_param_count(module, budget)
            if rank is None:
                ones = decomposition.full_rank(module)
                ones = 1 if isinstance(ones, int) else tuple(1 for _ in ones)
                assert decomposition.param_count(module, ones) > budget, (
                    f"{decomposition.name} on {name!r}: no rank for budget {budget:g}, "
                    f"but rank {ones!r} fits")
                continue
            msg = decomposition.validate_rank(module, rank)
            assert msg is None, f"{decomposition.name} on {name!r}: budget {budget:g}: {msg}"
            count = decomposition.param_count(module, rank)
            assert count <= budget, (f"{decomposition.name} on {name!r}: rank {rank!r} has "
                                     f"{count} params, over the budget {budget:g}")


@one_thread
def check_recompression(decomposition: Decomposition, *, layers=None, params=None,
                        rtol: float = 1e-10, **_) -> None:
    """If the decomposition accepts its own output, a second round at a smaller rank works.

    The module built in round one is checked and compressed again at rank 1; the
    result must compute the original dense layer with the round-two weight
    (``weight()`` of the new module) and must not have more parameters.
    """
    params = _params(decomposition, params)
    for name, config, module in _supported(decomposition, layers):
        built, _ = decomposition.compress(module, default_ranks(decomposition, module)[1], params)
        try:
            decomposition.check(name, built)
        except UnsupportedLayerError:
            continue  # no recompression: nothing to check
        full = decomposition.full_rank(built)
        small = 1 if isinstance(full, int) else tuple(1 for _ in full)
        again, _ = decomposition.compress(built, small, params)
        x = config.input()
        with torch.no_grad():
            _assert_close(again(x), _reference(module, decomposition.weight(again), x), rtol,
                          f"{decomposition.name} on {name!r}, round 2 at rank {small!r}")
        assert param_count(again) <= param_count(built), (
            f"{decomposition.name} on {name!r}: round 2 grew from {param_count(built)} "
            f"to {param_count(again)} params")


@one_thread
def check_factorized_module_class(decomposition: Decomposition, *, layers=None, params=None,
                                  **_) -> None:
    """``compress`` builds an instance of a named class with ``musco_decomposition`` set.

    A bare container (``nn.Sequential`` of the factor layers) or any other
    ``torch.nn`` class computes the right thing but cannot be told apart from an
    ordinary model part: the ``factorized`` matcher, later rounds and
    ``load_compressed`` rely on the class and its ``musco_decomposition`` tag.
    """
    params = _params(decomposition, params)
    for name, config, module in _supported(decomposition, layers):
        built, _ = decomposition.compress(module, default_ranks(decomposition, module)[1], params)
        cls = type(built)
        where = f"{decomposition.name} on {name!r}"
        assert not cls.__module__.startswith("torch."), (
            f"{where}: compress returned a bare {cls.__module__}.{cls.__name__}; build a "
            "named nn.Module subclass with a class attribute musco_decomposition")
        tag = getattr(built, "musco_decomposition", None)
        assert isinstance(tag, str) and tag, (
            f"{where}: the built {cls.__name__} has musco_decomposition={tag!r}; set it to "
            "the decomposition's name")


# -- tensorly as the independent reference ---------------------------------------------


def _tensorly():
    """tensorly, imported on first use (the core does not need it)."""
    import tensorly

    return tensorly


def svd_reference(factors, weight_shape) -> torch.Tensor:
    """``svd`` factors ``(first (r, in), second (out, r))`` through ``tl.cp_to_tensor``."""
    tl = _tensorly()
    first, second = factors
    with tl.backend_context("pytorch"):
        dense = tl.cp_to_tensor((None, [second, first.T]))
    return dense.reshape(weight_shape)


def tucker2_reference(factors, weight_shape) -> torch.Tensor:
    """``tucker2`` factors ``(first, core, last)`` through ``tl.tucker_to_tensor``."""
    tl = _tensorly()
    first, core, last = factors
    with tl.backend_context("pytorch"):
        # Tucker-2 is a Tucker decomposition with identity factors on the kernel modes.
        kernel = [torch.eye(k, dtype=core.dtype, device=core.device) for k in core.shape[2:]]
        dense = tl.tucker_to_tensor((core, [last, first.reshape(first.shape[0], -1).T, *kernel]))
    return dense.reshape(weight_shape)


def cp3_reference(factors, weight_shape) -> torch.Tensor:
    """``cp3`` factors ``(first (R, in), depthwise (R, kh, kw), last (out, R))`` through ``tl.cp_to_tensor``."""
    tl = _tensorly()
    first, depthwise, last = factors
    spatial = depthwise.reshape(depthwise.shape[0], -1).T
    with tl.backend_context("pytorch"):
        dense = tl.cp_to_tensor((None, [last, first.T, spatial]))
    return dense.reshape(weight_shape)


def cp4_reference(factors, weight_shape) -> torch.Tensor:
    """``cp4`` factors ``(first, vertical, horizontal, last)`` through ``tl.cp_to_tensor``."""
    tl = _tensorly()
    first, vertical, horizontal, last = factors
    with tl.backend_context("pytorch"):
        dense = tl.cp_to_tensor((None, [last, first.T, vertical.T, horizontal.T]))
    return dense.reshape(weight_shape)


@one_thread
def check_reconstruction_reference(decomposition: Decomposition, *, layers=None, params=None,
                                   reference=None, rtol: float = 1e-10, **_) -> None:
    """``reconstruct`` agrees with an independent reconstruction of the same factors.

    ``reference(factors, weight_shape) -> tensor`` rebuilds the dense weight from
    the decomposition's factors by other means; :func:`svd_reference`,
    :func:`tucker2_reference`, :func:`cp3_reference` and :func:`cp4_reference`
    do it with tensorly's ``cp_to_tensor`` / ``tucker_to_tensor`` for the
    first-party factor layouts. Without ``reference`` the check has nothing to
    compare with and passes.
    """
    if reference is None:
        return
    params = _params(decomposition, params)
    for name, config, module in _supported(decomposition, layers):
        weight = decomposition.weight(module).detach()
        for rank in default_ranks(decomposition, module):
            factors = decomposition.decompose(weight, rank, params)
            got = decomposition.reconstruct(factors)
            want = reference(factors, tuple(weight.shape))
            _assert_close(got.reshape(weight.shape), want, rtol,
                          f"{decomposition.name} on {name!r} at rank {rank!r}: reconstruct "
                          "against the reference")


#: Every check, in the order :func:`check_decomposition` runs them.
CHECKS: tuple[Callable[..., None], ...] = (
    check_supports_some_layer, check_validate_rank, check_param_count, check_flop_count,
    check_forward_equivalence, check_planted_recovery, check_compress_keeps_input,
    check_rank_for_param_count, check_recompression, check_factorized_module_class,
    check_reconstruction_reference,
)


def check_decomposition(decomposition: Decomposition, **options) -> None:
    """Run every check in :data:`CHECKS` on ``decomposition``; raise listing all failures.

    A check that raises anything else than :class:`AssertionError` counts as failed.

    Options (all keyword): ``layers`` (a dict of name to :class:`ConvConfig` /
    :class:`LinearConfig`, default :data:`DEFAULT_LAYERS`; layers the
    decomposition rejects with :class:`UnsupportedLayerError` are skipped),
    ``params`` (default ``decomposition.Params()``), ``rtol`` (forward
    equivalence, relative to the output norm, default ``1e-10``) and
    ``planted_rtol``, ``plant``, ``planted_ranks`` and ``planted_params`` (planted recovery, see
    :func:`check_planted_recovery`) and ``reference`` (an independent reconstruction,
    e.g. :func:`tucker2_reference` through tensorly; see :func:`check_reconstruction_reference`).
    """
    failures = []
    for check in CHECKS:
        try:
            check(decomposition, **options)
        except AssertionError as exc:
            failures.append(f"{check.__name__}: {exc}")
        except Exception as exc:  # a crash is a failure too, reported with the others
            failures.append(f"{check.__name__}: raised {type(exc).__name__}: {exc}")
    if failures:
        raise AssertionError(f"{decomposition!r} fails {len(failures)} check(s):\n"
                             + "\n".join(f"  - {f}" for f in failures))


def parametrize_with_checks(decompositions: Sequence[Decomposition | tuple[Decomposition, dict]],
                            **options):
    """A ``pytest.mark.parametrize`` over (decomposition, check) pairs, one test per pair.

    Entries are decompositions or ``(decomposition, options)`` pairs whose options
    override the shared ``options`` (see :func:`check_decomposition`)::

        @parametrize_with_checks([SVD(), (CP3(), {"planted_rtol": 1e-4})])
        def test_conformance(decomposition, check):
            check(decomposition)

    Test ids read ``<name>-<check>``, e.g. ``svd-check_flop_count``.
    """
    import pytest

    cases, ids = [], []
    for entry in decompositions:
        dec, own = entry if isinstance(entry, tuple) else (entry, {})
        for check in CHECKS:
            cases.append((dec, functools.partial(check, **{**options, **own})))
            ids.append(f"{dec.name or type(dec).__name__}-{check.__name__}")
    return pytest.mark.parametrize("decomposition, check", cases, ids=ids)


