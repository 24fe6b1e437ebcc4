"""The spec: which layers to compress, how, with which rank rule, in how many steps.

A spec is a tree of frozen attrs objects. It is plain data: strategy names and
parameters. Names are looked up in the registry and parameters are checked
against each strategy's ``Params`` class when a :class:`~musco_core.Compressor`
is created (or by :meth:`Spec.validate`).

The dict / TOML / YAML form writes a strategy as its name, or as a table with a
``name`` key and the parameters beside it::

    layers_per_step = 5
    exclude = ["classifier.*"]

    [[rules]]
    match = ["linear", "conv1x1"]
    decomposition = "svd"
    rank = { name = "param_reduction", rate = 2.0 }
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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


def _freeze(value: Any) -> Any:
    """Lists (how TOML, YAML and JSON write tuples) become tuples, mappings
    :class:`FrozenDict`, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    return value


def _params_dict(value: Any) -> FrozenDict:
    return FrozenDict({k: _freeze(v) for k, v in dict(value).items()})


@attrs.define(frozen=True, init=False, repr=False)
class _Ref:
    """A strategy by name, with parameters for its ``Params`` class."""

    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    params: Mapping[str, Any] = attrs.field(converter=_params_dict, hash=False)

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


class Match(_Ref):
    """A layer matcher by name: ``Match("glob", pattern="layer4.*")``."""


class RankRule(_Ref):
    """A rank rule by name: ``RankRule("param_reduction", rate=2.0)``."""


class Decompose(_Ref):
    """A decomposition by name, with parameters: ``Decompose("cp3", max_iter=200)``.

    A plain string (``decomposition="svd"``) is the same as ``Decompose("svd")``.
    """


def _to_match(value: Any) -> Any:
    if isinstance(value, str):
        return Match(value)
    return value


def _to_matches(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(_to_match(v) for v in value)
    return (_to_match(value),)


def _check_matches(instance, attribute, value) -> None:
    if not value:
        raise ValueError("'match' must name at least one matcher")
    for item in value:
        if not (isinstance(item, Match) or callable(item)):
            raise TypeError(
                f"'match' items must be a matcher name, a musco.Match or a callable "
                f"(name, module) -> bool; got {item!r}"
            )


def _int_to_float(value: Any) -> Any:
    """``2`` -> ``2.0`` for a float field (a bool stays a bool and is rejected)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _to_ref(cls: type[_Ref]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        return cls(value) if isinstance(value, str) else value

    return convert


def _optional_positive_int(instance, attribute, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name!r} must be a positive int or None, got {value!r}")


@attrs.frozen
class Rule:
    """Layers matched by ``match`` are factorized with ``decomposition`` at the ranks of ``rank``.

    ``match`` is any of: a matcher name, a :class:`Match`, a callable
    ``(name, module) -> bool``, or a list of these (a layer matching any of them
    is taken). The first rule that matches a layer decides for it.

    ``rounds`` limits the rule to some rounds (``rounds=[2]``: only round 2);
    empty means every round. A rule keeps the layers it compressed in later
    rounds it applies to.
    """

    match: tuple[Any, ...] = attrs.field(converter=_to_matches, validator=_check_matches)
    decomposition: Decompose = attrs.field(
        converter=_to_ref(Decompose), validator=attrs.validators.instance_of(Decompose)
    )
    rank: RankRule = attrs.field(
        converter=_to_ref(RankRule), validator=attrs.validators.instance_of(RankRule)
    )
    rounds: tuple[int, ...] = attrs.field(
        default=(),
        converter=tuple,
        validator=attrs.validators.deep_iterable(
            attrs.validators.and_(attrs.validators.instance_of(int), attrs.validators.ge(1))
        ),
    )
    #: What to do with a matched layer that cannot be compressed safely (a depthwise
    #: conv matched by ``conv_kxk``, a layer whose weight is tied to another's, a layer
    #: that never runs): ``"skip"`` leaves it as it is and lists it in the plan with
    #: the reason; ``"error"`` (strict) rejects the spec.
    unsupported: str = attrs.field(default="skip",
                                   validator=attrs.validators.in_(("error", "skip")))
    #: Skip a layer whose factorized version is not at least this much faster than
    #: the layer it would replace, measured on the compressor's device (``None``: off).
    min_speedup: float | None = attrs.field(
        default=None, converter=_int_to_float,
        validator=attrs.validators.optional(
            [attrs.validators.instance_of(float), attrs.validators.gt(0.0)]))
    #: Round the chosen rank by measured speed instead of always down: among the
    #: multiples of this number just below and above the rank, and the rank itself,
    #: take the one with the best measured speedup per unit of truncation error (the
    #: discarded share of the layer's spectrum, whitened with calibration data); see
    #: ``musco_core.latency.fastest_rank_near``. It may round *up*, so a reduction
    #: target can be missed by a little; not with ``round_to``, not for joint rules.
    round_by_speed: int | None = attrs.field(default=None, validator=_optional_positive_int)


def _non_negative_number(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{attribute.name!r} must be a number >= 0, got {value!r}")


def _optional_positive_number(instance, attribute, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0):
        raise ValueError(f"{attribute.name!r} must be a number > 0 or None, got {value!r}")


@attrs.frozen
class Calibration:
    """How much of the calibration data passed to :class:`~musco_core.Compressor` to use.

    The data itself never goes into the spec or a state file; the spec only caps it.
    ``None`` means no cap.
    """

    #: Use at most this many batches per pass over the calibration data.
    max_batches: int | None = attrs.field(default=None, validator=_optional_positive_int)
    #: Use at most this many samples (rows of the first tensor of a batch) per pass.
    max_samples: int | None = attrs.field(default=None, validator=_optional_positive_int)
    #: Whose outputs the data-aware fits, refinement and output errors aim at:
    #: ``"original"``: the model as it was handed to the compressor, always;
    #: ``"step"``: the model as it is at the start of each step (no correction of
    #: earlier steps' errors); ``"auto"``: the original until the model is changed
    #: between steps (fine-tuning: any parameter or buffer changed in place or
    #: replaced), from then on the model as it was at the start of the first step
    #: after the latest change -- so fits do not pull fine-tuned layers back toward
    #: the original while the layers after them were trained for the fine-tuned ones.
    reference: str = attrs.field(default="auto",
                                 validator=attrs.validators.in_(("auto", "original", "step")))


@attrs.frozen
class Refine:
    """Local refinement after each step, without labels (off while ``steps == 0``).

    The new factors of the step's layers are trained by Adam to reproduce the
    *original* layers' outputs on the calibration inputs they see now (``scope =
    "layer"``) or the original model's output (``scope = "model"``), for at most
    ``steps`` optimizer steps or ``seconds`` of wall time, whichever comes first.
    """

    #: Optimizer steps (one calibration batch each); 0 turns refinement off.
    steps: int = attrs.field(default=0, validator=[attrs.validators.instance_of(int),
                                                   attrs.validators.ge(0)])
    #: Wall-clock budget in seconds (``None``: only ``steps`` limits it).
    seconds: float | None = attrs.field(default=None, validator=_optional_positive_number)
    #: Adam learning rate.
    lr: float = attrs.field(default=1e-4, validator=_non_negative_number)
    #: Seed of the batch order, so a run is deterministic.
    seed: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))
    #: What the new factors are trained to reproduce: ``"layer"`` (each original
    #: layer's output, from the inputs the layer sees now) or ``"model"`` (the original
    #: model's output, with all of the step's new layers in place: each layer may then
    #: move away from its own original output to undo what it and the layers after it
    #: do to the model's output).
    scope: str = attrs.field(default="layer",
                             validator=attrs.validators.in_(("layer", "model")))


def _str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class Spec:
    """A compression strategy: rules, exclusions and the schedule.

    :param rules: :class:`Rule` objects; for each layer the first matching rule applies.
    :param exclude: glob patterns on dotted layer names that are never compressed.
    :param layers_per_step: layers compressed per :meth:`Compressor.step` (the seed's ``ft_every``).
    :param rounds: how many times every matched layer is compressed (the seed's
        ``nglobal_compress_iters``); round 2 compresses round 1's factorized layers again.
    """

    rules: tuple[Rule, ...] = attrs.field(
        converter=tuple,
        validator=attrs.validators.deep_iterable(attrs.validators.instance_of(Rule)),
    )
    exclude: tuple[str, ...] = attrs.field(
        default=(),
        converter=_str_tuple,
        validator=attrs.validators.deep_iterable(attrs.validators.instance_of(str)),
    )
    layers_per_step: int = attrs.field(
        default=5, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)]
    )
    rounds: int = attrs.field(
        default=1, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)]
    )
    #: Caps on the calibration data (see :class:`Calibration`).
    calibration: Calibration = attrs.field(
        factory=Calibration, validator=attrs.validators.instance_of(Calibration))
    #: Local refinement after each step (see :class:`Refine`; off by default).
    refine: Refine = attrs.field(factory=Refine, validator=attrs.validators.instance_of(Refine))

    # -- alternative constructors ------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Spec:
        """Build a spec from its dict form; every problem is reported with its path.

        Anything that is not a valid spec raises :class:`SpecError`, never another
        exception: keys must be strings, and values are not coerced (``2.9`` is not
        an int, ``"12"`` is not a list).
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a mapping, got {type(data).__name__} @ $")
        try:
            problems = _key_problems(data, "$")
            if problems:
                raise SpecError(problems)
            return _converter.structure(dict(data), cls)
        except SpecError:
            raise
        except (ClassValidationError, IterableValidationError) as exc:
            raise SpecError(cattrs.transform_error(exc, path="$", format_exception=_format)) from None
        except RecursionError:
            raise SpecError("the spec is nested too deeply @ $") from None
        except Exception as exc:  # a last resort: spec input never escapes as another type
            raise SpecError(f"{_format(exc, None)} @ $") from None

    @classmethod
    def from_toml(cls, text: str) -> Spec:
        """Build a spec from TOML text (see the module docstring for the form)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"invalid TOML: {exc}") from None
        except RecursionError:
            raise SpecError("invalid TOML: nested too deeply") from None
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, text: str) -> Spec:
        """Build a spec from YAML text (needs PyYAML: ``pip install musco[yaml]``)."""
        try:
            import yaml
        except ImportError:
            raise ImportError("Spec.from_yaml needs PyYAML: pip install 'musco[yaml]'") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"invalid YAML: {exc}") from None
        except RecursionError:
            raise SpecError("invalid YAML: nested too deeply") from None
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp like 2001-02-30
            raise SpecError(f"invalid YAML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        """Build a spec from JSON text."""
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"invalid JSON: {exc}") from None
        except RecursionError:
            raise SpecError("invalid JSON: nested too deeply") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        """Read a spec from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file.

        A file that does not exist raises :class:`FileNotFoundError`; every problem
        with its contents raises :class:`SpecError` naming the file.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        readers = {".toml": cls.from_toml, ".yaml": cls.from_yaml, ".yml": cls.from_yaml,
                   ".json": cls.from_json}
        if suffix not in readers:
            raise SpecError(
                f"unknown spec file type {suffix!r} for {path}; use .toml, .yaml or .json")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"{path} is not UTF-8 text: {exc}") from None
        try:
            return readers[suffix](text)
        except SpecError as exc:
            raise SpecError([f"{path}: {p}" for p in exc.problems]) from None

    # -- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The dict form (what :meth:`from_dict` reads). Callable matchers cannot be written."""
        return _converter.unstructure(self)

    def to_toml(self) -> str:
        """The TOML form (what :meth:`from_toml` reads)."""
        import tomli_w

        data = self.to_dict()
        _reject_none(data, "$")
        return tomli_w.dumps(data)

    def validate(self, registry=None) -> None:
        """Check strategy names and parameters against the registry; raise :class:`SpecError`.

        Layer-dependent checks (ranks against layer shapes, layer names in
        per-layer mappings) happen when a :class:`~musco_core.Compressor` is created.
        """
        from musco_core.plan import resolve_rules

        resolve_rules(self, registry)


def _reject_none(value: Any, path: str) -> None:
    if value is None:
        raise SpecError(
            f"TOML has no null, so None cannot be written @ {path}; leave such a layer out "
            "with Spec.exclude, or write the spec as YAML or JSON"
        )
    if isinstance(value, Mapping):
        for k, v in value.items():
            _reject_none(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_none(v, f"{path}[{i}]")


# -- the converter: dict form <-> spec objects ------------------------------------------

_converter = cattrs.Converter(forbid_extra_keys=True)


def _key_problems(value: Any, path: str) -> list[str]:
    """Every mapping key that is not a string (YAML's ``1: 2``), with its path."""
    problems: list[str] = []
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, Mapping):
            for k, v in item.items():
                if not isinstance(k, str):
                    problems.append(f"keys must be strings, got {k!r} ({type(k).__name__}) "
                                    f"@ {where}")
                else:
                    stack.append((v, f"{where}.{k}"))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return sorted(problems)


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
    _converter.register_structure_hook(_type, _hook)


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
            out.append(_converter.structure(item, item_type))
        except Exception as exc:
            exc.__notes__ = [*getattr(exc, "__notes__", []),
                             IterableValidationNote(f"Structuring {type_} @ index {i}", i,
                                                    item_type)]
            errors.append(exc)
    if errors:
        raise IterableValidationError(f"While structuring {type_!r}", errors, type_)
    return list(out) if typing.get_origin(type_) is list or type_ is list else tuple(out)


_converter.register_structure_hook_func(_is_sequence_type, _structure_sequence)


def _structure_exclude(value: Any, _type: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a glob pattern or a list of them, got {value!r}")
    return tuple(_converter.structure(value, tuple[str, ...]))


def _mapping_first(cls: type, hook: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Wrap an attrs class's structure hook: the input must be a table."""

    def structure(value: Any, type_: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table (mapping) for {cls.__name__}, got {value!r}")
        return hook(value, type_)

    return structure


def _structure_ref(cls: type[_Ref]) -> Callable[[Any, Any], _Ref]:
    def structure(value: Any, _type: Any) -> _Ref:
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


def _unstructure_ref(ref: _Ref) -> Any:
    if not ref.params:
        return ref.name
    return {"name": ref.name, **{k: _plain(v) for k, v in ref.params.items()}}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _structure_matches(value: Any, _type: Any) -> tuple[Match, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("'match' must name at least one matcher")
    return tuple(_structure_ref(Match)(v, Match) for v in items)


def _unstructure_match(item: Any) -> Any:
    if isinstance(item, Match):
        return _unstructure_ref(item)
    raise SpecError(
        f"a callable matcher ({item!r}) cannot be written to a dict or file; "
        "register it as a matcher plugin and refer to it by name"
    )


for _cls in (Match, RankRule, Decompose):
    _converter.register_structure_hook(_cls, _structure_ref(_cls))
    _converter.register_unstructure_hook(_cls, _unstructure_ref)

_converter.register_structure_hook(
    Rule,
    _mapping_first(Rule, cattrs.gen.make_dict_structure_fn(
        Rule,
        _converter,
        _cattrs_forbid_extra_keys=True,
        match=cattrs.gen.override(struct_hook=_structure_matches),
    )),
)
for _cls in (Calibration, Refine):
    _converter.register_structure_hook(
        _cls, _mapping_first(_cls, cattrs.gen.make_dict_structure_fn(
            _cls, _converter, _cattrs_forbid_extra_keys=True)))
_converter.register_structure_hook(
    Spec,
    _mapping_first(Spec, cattrs.gen.make_dict_structure_fn(
        Spec,
        _converter,
        _cattrs_forbid_extra_keys=True,
        exclude=cattrs.gen.override(struct_hook=_structure_exclude),
    )),
)
def _unstructure_rule(rule: Rule) -> dict[str, Any]:
    data = {
        "match": [_unstructure_match(m) for m in rule.match],
        "decomposition": _unstructure_ref(rule.decomposition),
        "rank": _unstructure_ref(rule.rank),
    }
    if rule.rounds:
        data["rounds"] = list(rule.rounds)
    if rule.unsupported != "skip":
        data["unsupported"] = rule.unsupported
    if rule.min_speedup is not None:
        data["min_speedup"] = rule.min_speedup
    if rule.round_by_speed is not None:
        data["round_by_speed"] = rule.round_by_speed
    return data


def _non_default(obj: Any) -> dict[str, Any]:
    """The fields of an attrs object that differ from their defaults (None is never written)."""
    fresh = type(obj)()
    return {a.name: getattr(obj, a.name) for a in attrs.fields(type(obj))
            if getattr(obj, a.name) != getattr(fresh, a.name)
            and getattr(obj, a.name) is not None}


_converter.register_unstructure_hook(Rule, _unstructure_rule)
def _unstructure_spec(spec: Spec) -> dict[str, Any]:
    data: dict[str, Any] = {
        "rules": [_converter.unstructure(r, Rule) for r in spec.rules],
        "exclude": list(spec.exclude),
        "layers_per_step": spec.layers_per_step,
        "rounds": spec.rounds,
    }
    for key in ("calibration", "refine"):
        fields = _non_default(getattr(spec, key))
        if fields:
            data[key] = fields
    return data


_converter.register_unstructure_hook(Spec, _unstructure_spec)


def _format(exc: BaseException, type_: Any) -> str:
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
        return cattrs.transform_error(exc, path=path, format_exception=_format)
    return [f"{_format(exc, None)} @ {path}"]


def structure_params(params: Mapping[str, Any], cls: type) -> Any:
    """Fill a strategy's ``Params`` class from a spec's parameters (unknown keys are errors)."""
    return _converter.structure(dict(params), cls)


def unstructure_params(params: Any) -> dict[str, Any]:
    """A strategy's ``Params`` instance as the plain dict a spec or manifest holds."""
    return _plain(_converter.unstructure(params))
