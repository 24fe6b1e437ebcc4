"""musco-pytorch's compressors (``CompressorVBMF``, ``CompressorPR``, ``CompressorManual``).

Same constructor arguments and loop as the seed project, built on :class:`Spec`
and :class:`Compressor` — one engine. See ``docs/migrating-from-musco-pytorch.md``.

::

    from musco_core.compat import CompressorVBMF

    compressor = CompressorVBMF(model, example_inputs, ft_every=5, nglobal_compress_iters=2)
    while not compressor.done:
        compressor.compression_step()
        fine_tune(compressor.compressed_model)
"""

from __future__ import annotations

import difflib
import glob
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from musco_core.engine import Compressor
from musco_core.errors import UnsupportedLayerError
from musco_core.registry import Registry, default_registry
from musco_core.spec import Match, RankRule, Rule, Spec

#: The seed's rank value meaning "choose automatically".
AUTO = -1


def _example_inputs(model_stats: Any, example_inputs: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    if isinstance(model_stats, (torch.Tensor, tuple, Mapping)):
        return model_stats
    size = getattr(model_stats, "img_size", None)  # flopco.FlopCo keeps the input size
    if size is not None:
        return torch.zeros(tuple(size))
    raise TypeError(
        "musco needs example inputs to measure the model: pass a tensor (or a FlopCo object "
        "with img_size) as model_stats, or example_inputs=..."
    )


def _family(module: nn.Module) -> str | None:
    """'kxk' for convs with a kernel larger than 1x1, 'matrix' for Linear and 1x1 convs."""
    if isinstance(module, nn.Linear):
        return "matrix"
    if isinstance(module, nn.Conv2d):
        return "matrix" if tuple(module.kernel_size) == (1, 1) else "kxk"
    return None


def _names(names) -> list[Match]:
    return [Match("glob", pattern=glob.escape(n)) for n in names]


class _SeedCompressor:
    """The seed's loop over a musco :class:`Compressor` (available as ``.compressor``)."""

    rank_selection = ""
    #: Keyword arguments of the rank rule that this compressor accepts.
    rank_keywords: tuple[str, ...] = ()

    def _check_keywords(self, given: Mapping[str, Any]) -> None:
        """A misspelled keyword is a TypeError naming it and the valid ones (not ignored)."""
        unknown = sorted(set(given) - set(self.rank_keywords))
        if not unknown:
            return
        own = inspect.signature(type(self).__init__).parameters
        valid = {n for n, p in own.items() if n != "self" and p.kind in (
            p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        base = inspect.signature(_SeedCompressor.__init__).parameters
        valid |= {n for n, p in base.items() if p.kind is p.KEYWORD_ONLY}
        valid |= set(self.rank_keywords)
        bad = unknown[0]
        close = difflib.get_close_matches(bad, valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TypeError(
            f"{type(self).__name__}() got an unexpected keyword argument {bad!r}; {hint}"
            f"valid keywords: {', '.join(sorted(valid))}"
        )

    def __init__(self, model: nn.Module, model_stats: Any = None, *,
                 conv2d_nn_decomposition: str | None = "tucker2",
                 ranks: Mapping[str, Any] | None = None,
                 ft_every: int | None = None,
                 nglobal_compress_iters: int | None = 1,
                 all_algo_kwargs: Any = None,
                 example_inputs: Any = None,
                 registry: Registry | None = None,
                 progress: bool | None = None,
                 **rank_params: Any):
        self._check_keywords(rank_params)
        if all_algo_kwargs:
            raise TypeError(
                "all_algo_kwargs is not supported: give decomposition parameters in a "
                "musco.Spec instead, e.g. decomposition=musco.Decompose('cp3', n_iter_max=200)"
            )
        registry = registry or default_registry()
        conv_decomposition = conv2d_nn_decomposition or "tucker2"
        ranks = dict(ranks or {})
        layers = {n: m for n, m in model.named_modules() if _family(m)}
        unknown = sorted(set(ranks) - set(layers))
        if unknown:
            raise ValueError(
                f"ranks names layers that are not Conv2d/Linear layers of the model: {unknown}"
            )
        decomposition = {"matrix": "svd", "kxk": conv_decomposition}
        skipped = {n for n, r in ranks.items() if r is None}
        unsupported = []
        for name, module in layers.items():
            if name in skipped:
                continue
            try:
                registry.get("decompositions", decomposition[_family(module)]).strategy.check(
                    name, module)
            except UnsupportedLayerError as exc:
                unsupported.append(name)
                warnings.warn(f"not compressed: {exc}", stacklevel=3)
            except KeyError:
                break  # an unknown decomposition name: the spec check below reports it
        excluded = sorted(skipped | set(unsupported))
        compressing = [n for n in layers if n not in excluded]
        manual = {n: (tuple(r) if isinstance(r, list) else r) for n, r in ranks.items()
                  if r is not None and r != AUTO}

        rules = []
        for family in ("kxk", "matrix"):
            names = [n for n in compressing if _family(layers[n]) == family]
            fixed = {n: manual[n] for n in names if n in manual}
            auto = [n for n in names if n not in manual]
            if fixed:
                rules.append(Rule(match=_names(fixed), decomposition=decomposition[family],
                                  rank=RankRule("fixed", ranks=fixed)))
            if auto:
                if not self.rank_selection:
                    raise ValueError(
                        f"{type(self).__name__} needs a rank for every compressed layer; "
                        f"missing for {auto[:5]} (set ranks[name] = None to skip a layer)"
                    )
                rules.append(Rule(match=_names(auto), decomposition=decomposition[family],
                                  rank=RankRule(self.rank_selection, **self._params(auto, rank_params))))
        if not rules:
            raise ValueError(
                f"{type(self).__name__}: no layer is left to compress (every Conv2d/Linear layer "
                f"is skipped by ranks[name] = None or not supported: {excluded[:5]}); remove "
                "some None entries from ranks")
        self.lnames = compressing
        self.spec = Spec(
            rules=rules,
            exclude=[glob.escape(n) for n in excluded],
            layers_per_step=max(1, min(ft_every or len(compressing), len(compressing) or 1)),
            rounds=nglobal_compress_iters or 1,
        )
        self.compressor = Compressor(model, self.spec, _example_inputs(model_stats, example_inputs),
                                     registry=registry, progress=progress)
        self.ranks: dict[str, Any] = {n: ranks.get(n, AUTO) for n in compressing}

    def _params(self, names: list[str], rank_params: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    @property
    def done(self) -> bool:
        return self.compressor.done

    @property
    def compressed_model(self) -> nn.Module:
        return self.compressor.model

    def compression_step(self):
        """Compress the next ``ft_every`` layers; returns the step's report."""
        report = self.compressor.step()
        for layer in report.compressed:
            self.ranks[layer.name] = layer.rank
        return report


class CompressorVBMF(_SeedCompressor):
    """Ranks by weakened EVBMF; Tucker-2 for kxk convs, SVD for Linear and 1x1 convs.

    ``vbmf_weakenen_factors={layer: w}`` (default 0.8 for every layer, as in the seed).
    """

    rank_selection = "vbmf"
    rank_keywords = ("vbmf_weakenen_factors",)

    def __init__(self, model, model_stats=None, ranks=None, vbmf_weakenen_factors=None,
                 ft_every=None, nglobal_compress_iters=1, all_algo_kwargs=None, **kwargs):
        super().__init__(model, model_stats, conv2d_nn_decomposition="tucker2", ranks=ranks,
                         ft_every=ft_every, nglobal_compress_iters=nglobal_compress_iters,
                         all_algo_kwargs=all_algo_kwargs,
                         vbmf_weakenen_factors=vbmf_weakenen_factors, **kwargs)

    def _params(self, names, rank_params):
        factors = rank_params.get("vbmf_weakenen_factors") or {}
        return {"weakening": 0.8,
                "weakenings": {n: float(w) for n, w in factors.items() if n in names}}


class CompressorPR(_SeedCompressor):
    """Ranks for a parameter-reduction rate per layer (``param_reduction_rates``, default 2)."""

    rank_selection = "param_reduction"
    rank_keywords = ("param_reduction_rates",)

    def __init__(self, model, model_stats=None, conv2d_nn_decomposition=None, ranks=None,
                 param_reduction_rates=None, ft_every=None, nglobal_compress_iters=1,
                 all_algo_kwargs=None, **kwargs):
        super().__init__(model, model_stats, conv2d_nn_decomposition=conv2d_nn_decomposition,
                         ranks=ranks, ft_every=ft_every,
                         nglobal_compress_iters=nglobal_compress_iters,
                         all_algo_kwargs=all_algo_kwargs,
                         param_reduction_rates=param_reduction_rates, **kwargs)

    def _params(self, names, rank_params):
        rates = rank_params.get("param_reduction_rates") or {}
        return {"rate": 2.0, "rates": {n: float(r) for n, r in rates.items() if n in names}}


class CompressorManual(_SeedCompressor):
    """Manually given ranks (``ranks={layer: rank or None}``; every compressed layer needs one)."""

    rank_selection = ""

    def __init__(self, model, model_stats=None, conv2d_nn_decomposition=None, ranks=None,
                 ft_every=None, nglobal_compress_iters=1, all_algo_kwargs=None, **kwargs):
        super().__init__(model, model_stats, conv2d_nn_decomposition=conv2d_nn_decomposition,
                         ranks=ranks, ft_every=ft_every,
                         nglobal_compress_iters=nglobal_compress_iters,
                         all_algo_kwargs=all_algo_kwargs, **kwargs)
