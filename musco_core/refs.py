"""Strategy references (a strategy by name, with parameters) and the spec's one converter.

A :class:`StrategyRef` is plain data: the name of a registered strategy and the
parameters for its ``Params`` class. Its dict / TOML / YAML form is the name, or a
table with a ``name`` key and the parameters beside it::

    rank = { name = "param_reduction", rate = 2.0 }
    gates = ["min_speedup", { name = "round_by_speed", multiple = 8 }]
    refine = { name = "model_output", steps = 200 }

:data:`converter` turns the dict form into spec objects and back. It coerces
nothing (``2.9`` is not an int, ``"12"`` is not a list); :func:`format_exception`
words its errors for :func:`cattrs.transform_error`, with did-you-mean hints.
"""

from __future__ import annotations

import sys
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from musco_core.errors import SpecError
from musco_core.registry import did_you_mean


class FrozenDict(Mapping):
    """A read-only, hashable mapping: the parameters of a frozen spec.

    It compares equal to a ``dict`` with the same items, reads like one
    (``params["rate"]``, ``dict(params)``) and cannot be changed in place.
    """

    __slots__ = ("_data",)

    def __init__(self, *args: Any, **kwargs: Any):
        object.__setattr__(self, "_data", dict(*args, **kwargs))

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self):
        return (type(self), (self._data,))


def freeze(value: Any) -> Any:
    """Lists (how TOML, YAML and JSON write tuples) become tuples, mappings
    :class:`FrozenDict`, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    return value


def freeze_params(value: Any) -> FrozenDict:
    """A strategy's parameters as a :class:`FrozenDict`, their values frozen."""
    return FrozenDict({k: freeze(v) for k, v in dict(value).items()})


def plain(value: Any) -> Any:
    """The inverse of :func:`freeze`: tuples become lists and mappings dicts, recursively."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def warn_deprecated(message: str) -> None:
    """A :class:`DeprecationWarning` attributed to the first caller outside musco, cattrs
    and attrs (so Python's default filters show it when that caller is ``__main__``)."""
    frame, level = sys._getframe(1), 2
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if not (module.split(".")[0] in ("musco_core", "cattrs", "attr", "attrs")
                or frame.f_code.co_filename.startswith(("<attrs generated",
                                                        "<cattrs generated"))):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


# -- strategy references -------------------------------------------------------------------


@attrs.define(frozen=True, init=False, repr=False)
class StrategyRef:
    """A strategy by name, with parameters for its ``Params`` class."""

    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    params: Mapping[str, Any] = attrs.field(converter=freeze_params, hash=False)

    def __init__(self, name: str, /, **params: Any):
        if "name" in params:
            raise SpecError(
                f"{type(self).__name__}({name!r}, name=...): a strategy parameter cannot be "
                "called 'name', because the table form uses 'name' for the strategy"
            )
        self.__attrs_init__(name, params)

    def __repr__(self) -> str:
        args = [repr(self.name)] + [f"{k}={v!r}" for k, v in self.params.items()]
        return f"{type(self).__name__}({', '.join(args)})"


class Match(StrategyRef):
    """A layer matcher by name: ``Match("glob", pattern="layer4.*")``."""


class RankRule(StrategyRef):
    """A rank rule by name: ``RankRule("param_reduction", rate=2.0)``."""


class Decompose(StrategyRef):
    """A decomposition by name, with parameters: ``Decompose("cp3", max_iter=200)``.

    A plain string (``decomposition="svd"``) is the same as ``Decompose("svd")``.
    """


class Gate(StrategyRef):
    """A gate by name, with parameters: ``Gate("min_speedup", factor=1.2)``.

    Listed in a rule's ``gates``; a plain string is the same as ``Gate(name)``.
    """


class Refine(StrategyRef):
    """Local refinement after each step, without labels, by a refiner by name.

    ``Refine("model_output", steps=200)``; the first-party refiners are
    ``"layer_output"`` (each new layer reproduces the original layer's output) and
    ``"model_output"`` (the step's new layers together reproduce the original
    model's output), with ``steps``, ``seconds``, ``lr`` and ``seed``.

    The form without a name, ``Refine(steps=200, scope="model")``, is deprecated
    and still loads (with a :class:`DeprecationWarning`); without ``steps`` (or
    with ``steps=0``) it means no refinement, and a :class:`~musco_core.Spec`
    holds ``None`` for it (see :attr:`off`).
    """

    def __init__(self, name: str | None = None, /, **params: Any):
        if name is not None:
            super().__init__(name, **params)
            return
        from musco_core.refs_legacy import LegacyRefine

        valid = [a.name for a in attrs.fields(LegacyRefine)]
        for key in params:
            if key not in valid:
                raise TypeError(f"Refine() got an unexpected keyword argument {key!r}; "
                                f"{did_you_mean(key, valid)}")
        self._init_legacy(LegacyRefine(**params), params, "python")

    @classmethod
    def from_legacy_table(cls, table: Mapping[str, Any]) -> Refine:
        """A refine table without ``name`` (deprecated), its values checked with their paths."""
        from musco_core.refs_legacy import LegacyRefine

        structure = mapping_first(Refine, cattrs.gen.make_dict_structure_fn(
            LegacyRefine, converter, _cattrs_forbid_extra_keys=True))
        legacy = structure(dict(table), LegacyRefine)
        ref = cls.__new__(cls)
        ref._init_legacy(legacy, table, "table")
        return ref

    def _init_legacy(self, legacy: Any, given: Iterable[str], form: str) -> None:
        from musco_core.refs_legacy import convert

        name, params, off, message = convert(legacy, given, form)
        warn_deprecated(message)
        self.__attrs_init__(name, params)
        object.__setattr__(self, "_off", off)

    @property
    def off(self) -> bool:
        """Whether this is the deprecated form without steps, i.e. no refinement."""
        return bool(self.__dict__.get("_off", False))


# -- the converter: dict form <-> spec objects ----------------------------------------------

#: The one converter of the dict form; unknown keys are errors.
converter = cattrs.Converter(forbid_extra_keys=True)


# Strict scalars: the dict form is what a file says, so nothing is coerced (cattrs
# would turn 2.9 into 2 and "12" into [1, 2]). An int is accepted where a float is.

def _structure_int(value: Any, _type: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _structure_float(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _structure_str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _structure_bool(value: Any, _type: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


for _type, _hook in ((int, _structure_int), (float, _structure_float), (str, _structure_str),
                     (bool, _structure_bool)):
    converter.register_structure_hook(_type, _hook)


def _is_sequence_type(type_: Any) -> bool:
    return typing.get_origin(type_) in (tuple, list, Sequence) or type_ in (tuple, list)


def _structure_sequence(value: Any, type_: Any) -> Any:
    """A list or tuple only (cattrs would iterate a string or a mapping), item by item."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {value!r}")
    args = typing.get_args(type_)
    if typing.get_origin(type_) is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise TypeError(f"expected a list of {len(args)} items, got {value!r}")
        types = args
    else:
        types = (args[0] if args else Any,) * len(value)
    out, errors = [], []
    for i, (item, item_type) in enumerate(zip(value, types)):
        try:
            out.append(converter.structure(item, item_type))
        except Exception as exc:
            exc.__notes__ = [*getattr(exc, "__notes__", []),
                             IterableValidationNote(f"Structuring {type_} @ index {i}", i,
                                                    item_type)]
            errors.append(exc)
    if errors:
        raise IterableValidationError(f"While structuring {type_!r}", errors, type_)
    return list(out) if typing.get_origin(type_) is list or type_ is list else tuple(out)


converter.register_structure_hook_func(_is_sequence_type, _structure_sequence)


def mapping_first(cls: type, hook: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Wrap an attrs class's structure hook: the input must be a table."""

    def structure(value: Any, type_: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table (mapping) for {cls.__name__}, got {value!r}")
        return hook(value, type_)

    return structure


def structure_ref(cls: type[StrategyRef]) -> Callable[[Any, Any], StrategyRef]:
    """The structure hook of a :class:`StrategyRef` class: a name, or a table with ``name``."""

    def structure(value: Any, _type: Any) -> StrategyRef:
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            params = dict(value)
            name = params.pop("name", None)
            if not isinstance(name, str):
                raise ValueError(
                    f"a table for a {cls.__name__} needs a 'name' key naming the strategy, "
                    f"got keys {sorted(map(str, value))}"
                )
            return cls(name, **params)
        raise TypeError(f"expected a name or a table with 'name', got {value!r}")

    return structure


def unstructure_ref(ref: StrategyRef) -> Any:
    """A reference's dict form: its name, or a table with ``name`` and the parameters."""
    if not ref.params:
        return ref.name
    return {"name": ref.name, **{k: plain(v) for k, v in ref.params.items()}}


def _structure_refine(value: Any, type_: Any) -> Refine:
    if isinstance(value, Mapping) and "name" not in value:
        return Refine.from_legacy_table(value)
    if isinstance(value, (str, Mapping)):
        return structure_ref(Refine)(value, type_)
    raise TypeError(f"expected a refiner name or a table (mapping) for Refine, got {value!r}")


for _cls in (Match, RankRule, Decompose, Gate):
    converter.register_structure_hook(_cls, structure_ref(_cls))
for _cls in (Match, RankRule, Decompose, Gate, Refine):
    converter.register_unstructure_hook(_cls, unstructure_ref)
converter.register_structure_hook(Refine, _structure_refine)


# -- errors and strategy parameters -----------------------------------------------------------


def format_exception(exc: BaseException, type_: Any) -> str:
    """Messages for :func:`cattrs.transform_error`: keep validators' words, suggest names."""
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        parts = []
        for key in sorted(exc.extra_fields, key=repr):
            hint = did_you_mean(key, valid) if isinstance(key, str) else \
                f"available: {', '.join(sorted(valid)) or 'none'}"
            parts.append(f"unknown key {key!r}; {hint}")
        return "; ".join(parts)
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, (ValueError, TypeError)) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]  # attrs' own validators put the attribute and values in args[1:]
    if isinstance(exc, (ValueError, TypeError)) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def format_params_error(exc: BaseException, path: str) -> list[str]:
    """Lines with paths for a failure to structure strategy parameters at ``path``."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        return cattrs.transform_error(exc, path=path, format_exception=format_exception)
    return [f"{format_exception(exc, None)} @ {path}"]


def structure_params(params: Mapping[str, Any], cls: type) -> Any:
    """Fill a strategy's ``Params`` class from a spec's parameters (unknown keys are errors)."""
    return converter.structure(dict(params), cls)


def unstructure_params(params: Any) -> dict[str, Any]:
    """A strategy's ``Params`` instance as the plain dict a spec or manifest holds."""
    return plain(converter.unstructure(params))
