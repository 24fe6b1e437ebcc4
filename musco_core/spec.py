"""The spec: which layers to compress, how, with which rank rule, in how many steps.

A spec is a tree of frozen attrs objects. It is plain data: strategy names and
parameters. Names are looked up in the registry and parameters are checked
against each strategy's ``Params`` class when a :class:`~musco_core.Compressor`
is created (or by :meth:`Spec.validate`).

The dict / TOML / YAML form writes a strategy as its name, or as a table with a
``name`` key and the parameters beside it (see :mod:`musco_core.refs`)::

    layers_per_step = 5
    exclude = ["classifier.*"]
    refine = { name = "layer_output", steps = 100 }

    [[rules]]
    match = ["linear", "conv1x1"]
    decomposition = "svd"
    rank = { name = "param_reduction", rate = 2.0 }
    gates = [{ name = "min_speedup", factor = 1.2 }]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, IterableValidationError

from musco_core.errors import SpecError
from musco_core.refs import (
    Decompose,
    FrozenDict,
    Gate,
    Match,
    RankRule,
    Refine,
    StrategyRef,
    converter,
    format_exception,
    format_params_error,
    mapping_first,
    structure_params,
    structure_ref,
    unstructure_params,
    unstructure_ref,
    warn_deprecated,
)
from musco_core.resolve import resolve_refine, resolve_rules


__all__ = [
    "MAX_ROUNDS", "Calibration", "Decompose", "FrozenDict", "Gate", "Match", "RankRule", "Refine",
    "Rule", "Spec", "StrategyRef", "format_params_error", "structure_params", "unstructure_params",
]


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


def _to_gates(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, Mapping, Gate)):
        value = [value]
    return tuple(Gate(v) if isinstance(v, str) else
                 structure_ref(Gate)(v, Gate) if isinstance(v, Mapping) else v for v in value)


def _int_to_float(value: Any) -> Any:
    """``2`` -> ``2.0`` for a float field (a bool stays a bool and is rejected)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _to_ref(cls: type[StrategyRef]) -> Any:
    def convert(value: Any) -> Any:
        return cls(value) if isinstance(value, str) else value

    return convert


def _optional_positive_int(instance, attribute, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name!r} must be a positive int or None, got {value!r}")


#: The most rounds a spec may ask for (``Spec.rounds``); more is a :class:`SpecError`.
#:
#: Why 100: every round compresses each of its layers again and is planned when it
#: starts, with the rounds after it projected, so planning grows with the rounds left;
#: and each round shrinks the ranks, so after a few dozen rounds a rank rule has
#: nothing left to take (MUSCO's own schedules use 2 to 10 rounds). 100 leaves ample
#: room for any real schedule while a typo (``rounds = 1000000``) fails at once
#: instead of planning for hours.
MAX_ROUNDS = 100


def _check_rounds(instance, attribute, value) -> None:
    if value < 1:
        raise SpecError(f"'rounds' must be >= 1, got {value!r} @ $.rounds")
    if value > MAX_ROUNDS:
        raise SpecError(f"'rounds' must be at most {MAX_ROUNDS}, got {value!r} @ $.rounds")


def _check_rules(instance, attribute, value) -> None:
    if not value:
        raise SpecError("'rules' must hold at least one rule; a spec without rules "
                        "compresses nothing @ $.rules")


#: The deprecated rule options and the gate (and its parameter) each one became.
LEGACY_GATES = {"round_by_speed": "multiple", "min_speedup": "factor"}


@attrs.frozen
class Rule:
    """Layers matched by ``match`` are factorized with ``decomposition`` at the ranks of ``rank``.

    ``match`` is any of: a matcher name, a :class:`Match`, a callable
    ``(name, module) -> bool``, or a list of these (a layer matching any of them
    is taken). The first rule that matches a layer decides for it.

    ``rounds`` limits the rule to some rounds (``rounds=[2]``: only round 2);
    empty means every round. A rule keeps the layers it compressed in later
    rounds it applies to.

    ``gates`` decide, around building each layer, at which rank it is built and
    whether it is kept: gate names or :class:`Gate` objects, e.g.
    ``gates=[Gate("min_speedup", factor=1.2)]`` (skip a layer whose factorized
    version is not at least 1.2x faster, measured) or
    ``Gate("round_by_speed", multiple=8)`` (round the rank by measured speed).
    The options ``min_speedup=`` and ``round_by_speed=`` are deprecated: they
    still load, with a :class:`DeprecationWarning`, as those gates (appended to
    ``gates``, ``round_by_speed`` first) and then read ``None``.
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
    #: Gates by name, in order (see above).
    gates: tuple[Gate, ...] = attrs.field(
        default=(), converter=_to_gates,
        validator=attrs.validators.deep_iterable(attrs.validators.instance_of(Gate)))
    #: Deprecated: ``Gate("min_speedup", factor=...)``; always ``None`` once built.
    min_speedup: float | None = attrs.field(
        default=None, converter=_int_to_float, repr=False,
        validator=attrs.validators.optional(
            [attrs.validators.instance_of(float), attrs.validators.gt(0.0)]))
    #: Deprecated: ``Gate("round_by_speed", multiple=...)``; always ``None`` once built.
    round_by_speed: int | None = attrs.field(default=None, repr=False,
                                             validator=_optional_positive_int)

    def __attrs_post_init__(self) -> None:
        gates = list(self.gates)
        for key, param in LEGACY_GATES.items():
            value = getattr(self, key)
            if value is None:
                continue
            gate = Gate(key, **{param: value})
            gates.append(gate)
            warn_deprecated(
                f"Rule({key}={value!r}) ({key} = {value!r} in a rule's table) is deprecated; "
                f"write gates=[{gate!r}] (in TOML: gates = [{{ name = \"{key}\", "
                f"{param} = {value!r} }}])")
            object.__setattr__(self, key, None)
        object.__setattr__(self, "gates", tuple(gates))


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


def _str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _to_refine(value: Any) -> Any:
    """A refiner name becomes a :class:`Refine`; the deprecated form without steps, ``None``."""
    if isinstance(value, str):
        return Refine(value)
    return None if isinstance(value, Refine) and value.off else value


@attrs.frozen
class Spec:
    """A compression strategy: rules, exclusions and the schedule.

    :param rules: :class:`Rule` objects; for each layer the first matching rule applies.
    :param exclude: glob patterns on dotted layer names that are never compressed.
    :param layers_per_step: layers compressed per :meth:`Compressor.step` (the seed's ``ft_every``).
    :param rounds: how many times every matched layer is compressed (the seed's
        ``nglobal_compress_iters``); round 2 compresses round 1's factorized layers again.
        At most :data:`MAX_ROUNDS` (100); more is a :class:`SpecError` (``@ $.rounds``).
    """

    rules: tuple[Rule, ...] = attrs.field(
        converter=tuple,
        validator=[attrs.validators.deep_iterable(attrs.validators.instance_of(Rule)),
                   _check_rules],
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
        default=1, validator=[attrs.validators.instance_of(int), _check_rounds]
    )
    #: Caps on the calibration data (see :class:`Calibration`).
    calibration: Calibration = attrs.field(
        factory=Calibration, validator=attrs.validators.instance_of(Calibration))
    #: Local refinement after each step by a refiner (see :class:`Refine`; ``None``: off).
    refine: Refine | None = attrs.field(
        default=None, converter=_to_refine,
        validator=attrs.validators.optional(attrs.validators.instance_of(Refine)))

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
            from musco_core.spec_text import key_problems

            problems = key_problems(data, "$")
            if problems:
                raise SpecError(problems)
            return converter.structure(dict(data), cls)
        except SpecError:
            raise
        except (ClassValidationError, IterableValidationError) as exc:
            own = [e for e in exc.exceptions if isinstance(e, SpecError)]
            if own and len(own) == len(exc.exceptions):  # Spec's own checks carry their paths
                raise SpecError([p for e in own for p in e.problems]) from None
            raise SpecError(cattrs.transform_error(exc, path="$", format_exception=format_exception)) from None
        except RecursionError:
            raise SpecError("the spec is nested too deeply @ $") from None
        except Exception as exc:  # a last resort: spec input never escapes as another type
            raise SpecError(f"{format_exception(exc, None)} @ $") from None

    @classmethod
    def from_toml(cls, text: str) -> Spec:
        """Build a spec from TOML text (see the module docstring for the form)."""
        from musco_core.spec_text import parse

        return cls.from_dict(parse(text, "toml"))

    @classmethod
    def from_yaml(cls, text: str) -> Spec:
        """Build a spec from YAML text (needs PyYAML: ``pip install musco[yaml]``)."""
        from musco_core.spec_text import parse

        return cls.from_dict(parse(text, "yaml"))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        """Build a spec from JSON text."""
        from musco_core.spec_text import parse

        return cls.from_dict(parse(text, "json"))

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        """Read a spec from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file.

        A file that does not exist raises :class:`FileNotFoundError`; every problem
        with its contents raises :class:`SpecError` naming the file.
        """
        from musco_core.spec_text import parse, read

        path = Path(path)
        form, text = read(path)
        try:
            return cls.from_dict(parse(text, form))
        except SpecError as exc:
            raise SpecError([f"{path}: {p}" for p in exc.problems]) from None

    # -- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The dict form (what :meth:`from_dict` reads). Callable matchers cannot be written."""
        return converter.unstructure(self)

    def to_toml(self) -> str:
        """The TOML form (what :meth:`from_toml` reads)."""
        from musco_core.spec_text import to_toml

        return to_toml(self.to_dict())

    def validate(self, registry=None) -> None:
        """Check strategy names and parameters against the registry; raise :class:`SpecError`.

        Rules (with their gates and the statistics their strategies need) and the
        refiner are checked; every problem is listed, with its path.

        Layer-dependent checks (ranks against layer shapes, layer names in
        per-layer mappings) happen when a :class:`~musco_core.Compressor` is created.
        """
        problems: list[str] = []
        for resolve in (resolve_rules, resolve_refine):
            try:
                resolve(self, registry)
            except SpecError as exc:
                problems += exc.problems
        if problems:
            raise SpecError(problems)




# -- the dict form of rules and specs (strategy references: musco_core.refs) ------------------


def _structure_exclude(value: Any, _type: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a glob pattern or a list of them, got {value!r}")
    return tuple(converter.structure(value, tuple[str, ...]))


def _structure_matches(value: Any, _type: Any) -> tuple[Match, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("'match' must name at least one matcher")
    return tuple(structure_ref(Match)(v, Match) for v in items)


def _structure_gates(value: Any, _type: Any) -> tuple[Gate, ...]:
    if isinstance(value, (str, Mapping)):
        return (converter.structure(value, Gate),)
    return converter.structure(value, tuple[Gate, ...])


def _unstructure_match(item: Any) -> Any:
    if isinstance(item, Match):
        return unstructure_ref(item)
    raise SpecError(
        f"a callable matcher ({item!r}) cannot be written to a dict or file; "
        "register it as a matcher plugin and refer to it by name"
    )


converter.register_structure_hook(
    Rule,
    mapping_first(Rule, cattrs.gen.make_dict_structure_fn(
        Rule,
        converter,
        _cattrs_forbid_extra_keys=True,
        match=cattrs.gen.override(struct_hook=_structure_matches),
        gates=cattrs.gen.override(struct_hook=_structure_gates),
    )),
)
converter.register_structure_hook(
    Calibration, mapping_first(Calibration, cattrs.gen.make_dict_structure_fn(
        Calibration, converter, _cattrs_forbid_extra_keys=True)))
converter.register_structure_hook(
    Spec,
    mapping_first(Spec, cattrs.gen.make_dict_structure_fn(
        Spec,
        converter,
        _cattrs_forbid_extra_keys=True,
        exclude=cattrs.gen.override(struct_hook=_structure_exclude),
    )),
)


def _unstructure_rule(rule: Rule) -> dict[str, Any]:
    data = {
        "match": [_unstructure_match(m) for m in rule.match],
        "decomposition": unstructure_ref(rule.decomposition),
        "rank": unstructure_ref(rule.rank),
    }
    if rule.rounds:
        data["rounds"] = list(rule.rounds)
    if rule.unsupported != "skip":
        data["unsupported"] = rule.unsupported
    if rule.gates:
        data["gates"] = [unstructure_ref(g) for g in rule.gates]
    return data


def _non_default(obj: Any) -> dict[str, Any]:
    """The fields of an attrs object that differ from their defaults (None is never written)."""
    fresh = type(obj)()
    return {a.name: getattr(obj, a.name) for a in attrs.fields(type(obj))
            if getattr(obj, a.name) != getattr(fresh, a.name)
            and getattr(obj, a.name) is not None}


def _unstructure_spec(spec: Spec) -> dict[str, Any]:
    data: dict[str, Any] = {
        "rules": [converter.unstructure(r, Rule) for r in spec.rules],
        "exclude": list(spec.exclude),
        "layers_per_step": spec.layers_per_step,
        "rounds": spec.rounds,
    }
    calibration = _non_default(spec.calibration)
    if calibration:
        data["calibration"] = calibration
    if spec.refine is not None:
        data["refine"] = unstructure_ref(spec.refine)
    return data


converter.register_unstructure_hook(Rule, _unstructure_rule)
converter.register_unstructure_hook(Spec, _unstructure_spec)
