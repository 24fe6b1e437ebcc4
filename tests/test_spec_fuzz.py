"""Fuzzing the spec readers: any input gives a spec or a SpecError, never another exception.

The inputs are nested JSON-like values built from the spec's own keys and
strategy names (so that many get deep into the converter), random keys and
values of every JSON type, integer keys (YAML's ``1: 2``), and the same values
written as TOML, YAML and JSON text. The ``ci`` profile runs a few hundred
inputs per test; ``HYPOTHESIS_PROFILE=dev`` runs a few thousand.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musco_core import Spec, SpecError

KEYS = ["rules", "exclude", "layers_per_step", "rounds", "calibration", "refine", "match",
        "decomposition", "rank", "unsupported", "gates", "min_speedup", "round_by_speed", "name",
        "rate", "ranks", "pattern", "class_name", "max_batches", "max_samples", "reference",
        "steps", "seconds", "lr", "seed", "scope", "factor", "multiple"]
NAMES = ["linear", "conv1x1", "conv_kxk", "glob", "type", "svd", "tucker2", "cp3", "fixed",
         "param_reduction", "vbmf", "skip", "error", "min_speedup", "round_by_speed",
         "layer_output", "model_output", "layer", "model"]

# Deprecated forms (min_speedup = ..., a refine table without a name) load with a warning.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(NAMES), st.text(max_size=8),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(keys, inner, max_size=5)),
    max_leaves=25,
)
# YAML gives integer, float, bool and null keys too.
yaml_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(keys, st.integers(), st.booleans(),
                                                      st.none()), inner, max_size=5)),
    max_leaves=25,
)

VALID = {
    "rules": [{"match": ["linear", {"name": "glob", "pattern": "a.*"}], "decomposition": "svd",
               "rank": {"name": "param_reduction", "rate": 2.0}, "rounds": [1],
               "gates": [{"name": "round_by_speed", "multiple": 8},
                         {"name": "min_speedup", "factor": 1.2}]},
              {"match": "conv1x1", "decomposition": "svd", "rank": "vbmf", "min_speedup": 1.1,
               "round_by_speed": 4}],
    "exclude": ["classifier*"], "layers_per_step": 2, "rounds": 1,
    "calibration": {"max_batches": 2},
    "refine": {"name": "model_output", "steps": 1, "lr": 0.001},
}
LEGACY_REFINE = {"steps": 1, "lr": 0.001, "scope": "model"}
LEGACY = object()  # a path starting here mutates VALID with LEGACY_REFINE as its refine table


def _paths(value, prefix=()):
    """Every path into a nested dict/list value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


PATHS = list(_paths(VALID))[1:] + [(LEGACY, k) for k in LEGACY_REFINE]


def _replace(value, path, new):
    if not path:
        return new
    if path[0] is LEGACY:
        return {**value, "refine": {**LEGACY_REFINE, path[1]: new}}
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)
    return copy


# Near-valid specs: one value of a valid spec replaced by anything.
mutated = st.builds(_replace, st.just(VALID), st.sampled_from(PATHS), yaml_like)
spec_inputs = st.one_of(json_like, yaml_like, mutated,
                        st.dictionaries(st.sampled_from(KEYS), json_like, max_size=6))

FAST = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow,
                                                           HealthCheck.filter_too_much])
DEV = settings(max_examples=3000)


def _settings(test):
    from hypothesis import settings as current

    return (DEV if current.default.max_examples >= 200 else FAST)(test)


def check(read, data) -> None:
    """``read(data)`` gives a Spec that round-trips, or raises SpecError with paths."""
    try:
        spec = read(data)
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    assert isinstance(spec, Spec)
    assert Spec.from_dict(spec.to_dict()) == spec
    try:
        spec.validate()
    except SpecError:
        pass


@_settings
@given(spec_inputs)
def test_from_dict_raises_only_spec_errors(data):
    check(Spec.from_dict, data)


@_settings
@given(yaml_like)
def test_from_yaml_raises_only_spec_errors(data):
    text = yaml.safe_dump(data)
    check(Spec.from_yaml, text)


@_settings
@given(json_like)
def test_from_json_raises_only_spec_errors(data):
    text = json.dumps(data)
    check(Spec.from_json, text)


def _tomlable(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return True
    if isinstance(value, dict):
        return all(_tomlable(v) for v in value.values())
    if isinstance(value, list):
        return all(_tomlable(v) for v in value)
    return True


@_settings
@given(st.one_of(st.dictionaries(keys, json_like, max_size=5), mutated))
def test_from_toml_raises_only_spec_errors(data):
    import tomli_w

    if not _tomlable(data):
        data = {"rules": data} if not isinstance(data, dict) else data
    try:
        text = tomli_w.dumps(data)
    except (TypeError, ValueError):
        text = repr(data)  # not TOML at all: the parser's error must be a SpecError too
    check(Spec.from_toml, text)


@_settings
@given(st.text(max_size=60))
def test_arbitrary_text_raises_only_spec_errors(text):
    for read in (Spec.from_toml, Spec.from_yaml, Spec.from_json):
        check(read, text)


@pytest.mark.parametrize("text", [
    "[" * 2000,                                  # JSON nested too deeply
    "a = " + "[" * 2000,                         # TOML nested too deeply
    "date: 2001-02-30",                          # YAML timestamp that is not a date
    "1: 2\nrules: []",                           # integer key
    "? [1, 2]\n: 3",                             # unhashable key
])
def test_hostile_text(text):
    for read in (Spec.from_toml, Spec.from_yaml, Spec.from_json):
        check(read, text)
