"""The spec: construction, dict/TOML/YAML round trips, and an error for every bad input."""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import musco_core as musco
from musco_core import Decompose, Match, RankRule, Rule, Spec, SpecError
from musco_core.resolve import resolve_refine, resolve_rules
from musco_core.spec import Gate, Refine
from musco_core.strategies import GateStrategy, Refiner, Statistic


def make_spec(**overrides) -> Spec:
    fields = dict(
        rules=[Rule(match=["linear", "conv1x1"], decomposition="svd",
                    rank=RankRule("param_reduction", rate=2.0))],
        exclude=["classifier*"],
        layers_per_step=3,
    )
    fields.update(overrides)
    return Spec(**fields)


def compress(model, spec, inputs):
    return musco.Compressor(model, spec, example_inputs=inputs, progress=False)


def problems_of(excinfo) -> str:
    return "\n".join(excinfo.value.problems)


# -- construction and round trips --------------------------------------------------------


def test_strings_become_refs_and_specs_are_frozen():
    rule = Rule(match="linear", decomposition="svd", rank="fixed")
    assert rule.match == (Match("linear"),)
    assert rule.decomposition == Decompose("svd")
    assert rule.rank == RankRule("fixed")
    spec = Spec(rules=[rule])
    with pytest.raises(AttributeError):
        spec.rounds = 2  # type: ignore[misc]
    assert repr(RankRule("param_reduction", rate=2.0)) == "RankRule('param_reduction', rate=2.0)"


names = st.sampled_from(["linear", "conv1x1", "conv_kxk"])
globs = st.builds(lambda p: Match("glob", pattern=p), st.sampled_from(["a.*", "layer?.conv*"]))
ranks = st.one_of(
    st.builds(lambda r: RankRule("param_reduction", rate=r), st.floats(1.01, 16)),
    st.builds(lambda r: RankRule("fixed", rank=r), st.integers(1, 64)),
    st.builds(lambda a, b: RankRule("fixed", ranks={"x.y": (a, b), "z": 3}),
              st.integers(1, 8), st.integers(1, 8)),
)
gates = st.one_of(
    st.sampled_from(["min_speedup", "round_by_speed"]),
    st.builds(lambda f: Gate("min_speedup", factor=f), st.floats(1.0, 4.0)),
    st.builds(lambda m: Gate("round_by_speed", multiple=m), st.integers(1, 64)),
)
refines = st.one_of(
    st.none(),
    st.sampled_from(["layer_output", "model_output"]).map(Refine),
    st.builds(lambda n, steps, lr: Refine(n, steps=steps, lr=lr),
              st.sampled_from(["layer_output", "model_output"]), st.integers(0, 500),
              st.floats(1e-6, 1.0)),
)
specs = st.builds(
    Spec,
    rules=st.lists(
        st.builds(Rule, match=st.lists(st.one_of(names, globs), min_size=1, max_size=3),
                  decomposition=st.just("svd"), rank=ranks,
                  gates=st.lists(gates, max_size=2)),
        min_size=1, max_size=3),
    exclude=st.lists(st.sampled_from(["fc", "head.*", "*.bn"]), max_size=2),
    layers_per_step=st.integers(1, 10),
    rounds=st.integers(1, 3),
    refine=refines,
)


@given(specs)
def test_dict_and_toml_round_trip(spec):
    assert Spec.from_dict(spec.to_dict()) == spec
    assert Spec.from_toml(spec.to_toml()) == spec


def test_none_round_trips_through_dict_and_yaml_but_toml_says_why_not():
    spec = make_spec(rules=[Rule(match="linear", decomposition="svd",
                                 rank=RankRule("fixed", rank=2, ranks={"fc": None}))])
    assert Spec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match=r"None cannot be written @ \$\.rules\[0\]\.rank\.ranks\.fc"):
        spec.to_toml()


def test_yaml_round_trip():
    yaml = pytest.importorskip("yaml")
    spec = make_spec()
    assert Spec.from_yaml(yaml.safe_dump(spec.to_dict())) == spec


def test_toml_form_is_what_the_docs_show(tmp_path):
    text = """
layers_per_step = 5
exclude = ["classifier.*"]

[[rules]]
match = ["linear", { name = "glob", pattern = "features.*" }]
decomposition = "svd"
rank = { name = "param_reduction", rate = 2.0 }
"""
    spec = Spec.from_toml(text)
    assert spec.rules[0].match == (Match("linear"), Match("glob", pattern="features.*"))
    assert spec.rules[0].rank == RankRule("param_reduction", rate=2.0)
    path = tmp_path / "spec.toml"
    path.write_text(text)
    assert Spec.load(path) == spec


def test_callable_matchers_work_but_cannot_be_written():
    spec = Spec(rules=[Rule(match=lambda name, module: name == "fc", decomposition="svd",
                            rank=RankRule("fixed", rank=2))])
    with pytest.raises(SpecError, match="callable matcher"):
        spec.to_dict()


# -- errors from the dict form: every problem, with its path -----------------------------


def test_unknown_keys_are_reported_with_path_and_suggestion():
    data = make_spec().to_dict()
    data["layer_per_step"] = 2
    data["rules"][0]["rnak"] = "fixed"
    with pytest.raises(SpecError) as excinfo:
        Spec.from_dict(data)
    text = problems_of(excinfo)
    assert "unknown key 'layer_per_step'; did you mean 'layers_per_step'?" in text
    assert "@ $.rules[0]" in text and "'rnak'" in text and "did you mean 'rank'?" in text


def test_bad_values_are_reported_with_path():
    data = make_spec().to_dict()
    data["layers_per_step"] = 0
    with pytest.raises(SpecError, match=r"'layers_per_step' must be >= 1: 0 @ \$"):
        Spec.from_dict(data)
    data = make_spec().to_dict()
    data["rules"][0]["rank"] = {"rate": 2.0}
    data["rules"][0]["decomposition"] = 3
    with pytest.raises(SpecError) as excinfo:
        Spec.from_dict(data)
    text = problems_of(excinfo)
    assert "needs a 'name' key naming the strategy, got keys ['rate'] @ $.rules[0].rank" in text
    assert "expected a name or a table with 'name', got 3 @ $.rules[0].decomposition" in text


def test_invalid_toml_is_a_spec_error():
    with pytest.raises(SpecError, match="invalid TOML"):
        Spec.from_toml("rules = [")


def test_integer_keys_are_spec_errors():
    yaml = pytest.importorskip("yaml")
    with pytest.raises(SpecError, match=r"^keys must be strings, got 1 \(int\) @ \$$"):
        Spec.from_yaml("1: 2\nrules: []")
    data = make_spec().to_dict()
    data["rules"][0]["rank"][7] = "x"
    with pytest.raises(SpecError, match=r"keys must be strings, got 7 \(int\) @ \$\.rules\[0\]\.rank$"):
        Spec.from_dict(data)
    del yaml


def test_bad_json_and_non_utf8_files_are_spec_errors(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text("{bad")
    with pytest.raises(SpecError, match=r"spec\.json: invalid JSON: Expecting property name"):
        Spec.load(path)
    path = tmp_path / "spec.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(SpecError, match=r"spec\.toml is not UTF-8 text"):
        Spec.load(path)
    with pytest.raises(SpecError, match=r"invalid JSON"):
        Spec.from_json("[" * 5000)


@pytest.mark.parametrize("path, value, message", [
    (("layers_per_step",), 2.9, r"expected an integer, got 2\.9 @ \$\.layers_per_step"),
    (("layers_per_step",), True, r"expected an integer, got True @ \$\.layers_per_step"),
    (("rounds",), "12", r"expected an integer, got '12' @ \$\.rounds"),
    (("rules", 0, "rounds"), "12", r"expected a list, got '12' @ \$\.rules\[0\]\.rounds"),
    (("rules", 0, "rounds"), [1.0], r"expected an integer, got 1\.0 @ \$\.rules\[0\]\.rounds\[0\]"),
    (("rules",), "abc", r"expected a list, got 'abc' @ \$\.rules"),
    (("rules", 0, "unsupported"), 1, r"expected a string, got 1 @ \$\.rules\[0\]\.unsupported"),
    (("rules", 0, "min_speedup"), "2", r"expected a number, got '2' @ \$\.rules\[0\]\.min_speedup"),
    (("rules", 0, "round_by_speed"), 2.0, r"expected an integer, got 2\.0 @ \$\.rules\[0\]\.round_by_speed"),
    (("rules", 0, "gates"), 3, r"expected a list, got 3 @ \$\.rules\[0\]\.gates"),
    (("rules", 0, "gates"), ["min_speedup", 3],
     r"expected a name or a table with 'name', got 3 @ \$\.rules\[0\]\.gates\[1\]"),
    (("exclude",), {"a": 1}, r"expected a glob pattern or a list of them, got \{'a': 1\} @ \$\.exclude"),
    (("calibration",), {"max_batches": 2.5}, r"expected an integer, got 2\.5 @ \$\.calibration\.max_batches"),
    (("refine",), {"lr": "0.1"}, r"expected a number, got '0\.1' @ \$\.refine\.lr"),
    (("refine",), 3, r"expected a refiner name or a table \(mapping\) for Refine, got 3 @ \$\.refine"),
    (("refine",), {"name": 3}, r"a table for a Refine needs a 'name' key .* @ \$\.refine"),
    (("refine",), {"steps": 2, "scope": "net"}, r"'scope' must be in \('layer', 'model'\) "
                                                 r"\(got 'net'\) @ \$\.refine"),
    (("refine",), {"stpes": 2}, r"unknown key 'stpes'; did you mean 'steps'\? .*@ \$\.refine"),
])
def test_values_are_not_coerced(path, value, message):
    data = make_spec().to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SpecError, match=message):
        Spec.from_dict(data)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_int_is_accepted_where_a_float_is():
    data = make_spec().to_dict()
    data["rules"][0]["min_speedup"] = 1
    data["refine"] = {"steps": 1, "lr": 1}
    spec = Spec.from_dict(data)
    (gate,) = spec.rules[0].gates
    assert gate == Gate("min_speedup", factor=1.0) and isinstance(gate.params["factor"], float)
    assert isinstance(spec.refine.params["lr"], float) and spec.refine.params["lr"] == 1.0
    rule = Rule(match="linear", decomposition="svd", rank="fixed", min_speedup=2)
    assert isinstance(rule.gates[0].params["factor"], float)


def test_spec_params_are_immutable_and_compare_like_dicts():
    spec = Spec.from_dict(make_spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule(
        "fixed", ranks={"fc": (1, 2)}))]).to_dict())
    params = spec.rules[0].rank.params
    with pytest.raises(TypeError):
        params["rank"] = 5  # type: ignore[index]
    with pytest.raises(TypeError):
        params["ranks"]["fc"] = 3  # type: ignore[index]
    assert params == {"ranks": {"fc": (1, 2)}} and dict(params) == {"ranks": {"fc": (1, 2)}}
    assert hash(RankRule("fixed", rank=2)) == hash(RankRule("fixed", rank=2))
    import copy
    import pickle

    assert copy.deepcopy(spec) == spec and pickle.loads(pickle.dumps(spec)) == spec


def test_type_matcher_can_be_written_in_every_form(tmp_path):
    spec = Spec.from_toml("""
[[rules]]
match = { name = "type", class_name = "Linear" }
decomposition = "svd"
rank = { name = "fixed", rank = 1 }
""")
    assert spec.rules[0].match == (Match("type", class_name="Linear"),)
    assert Spec.from_dict(spec.to_dict()) == spec and Spec.from_toml(spec.to_toml()) == spec
    model = nn.Sequential(nn.Conv1d(4, 8, 1), nn.Flatten(), nn.Linear(8 * 5, 2))
    compressor = compress(model, spec, torch.randn(1, 4, 5))
    assert compressor.plan.layers == ("2",)
    compressor.save(tmp_path / "state.musco")
    resumed = musco.Compressor.resume(tmp_path / "state.musco", model, progress=False)
    assert resumed.spec == spec
    with pytest.raises(SpecError, match="a strategy parameter cannot be called 'name'"):
        Match("type", name="Linear")


def test_a_one_element_list_is_not_a_matrix_rank():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    spec = Spec.from_dict({"rules": [{"match": "linear", "decomposition": "svd",
                                      "rank": {"name": "fixed", "rank": [8]}}], "exclude": ["2"]})
    with pytest.raises(SpecError, match=r"layer '0': rank \(8,\) is not an int for decomposition 'svd' @ \$\.rules\[0\]"):
        compress(model, spec, torch.zeros(1, 16))


# -- errors that need the registry and the model -----------------------------------------


def test_unknown_strategy_names_suggest_the_closest(tiny_resnet, example_inputs):
    spec = Spec(rules=[Rule(match=["linaer"], decomposition="tuckr2", rank=RankRule("fixd", rank=2))])
    with pytest.raises(SpecError) as excinfo:
        compress(tiny_resnet, spec, example_inputs)
    text = problems_of(excinfo)
    assert "unknown matcher 'linaer'; did you mean 'linear'?" in text
    assert "@ $.rules[0].match[0]" in text
    assert "unknown decomposition 'tuckr2'; did you mean 'tucker2'?" in text
    assert "unknown rank rule 'fixd'; did you mean 'fixed'?" in text
    assert len(excinfo.value.problems) == 3


def test_unknown_and_invalid_params(tiny_resnet, example_inputs):
    spec = Spec(rules=[
        Rule(match=Match("glob", patern="fc"), decomposition="svd",
             rank=RankRule("param_reduction", rate=1.0)),
        Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=0, round_to=-8)),
    ])
    with pytest.raises(SpecError) as excinfo:
        compress(tiny_resnet, spec, example_inputs)
    text = problems_of(excinfo)
    assert "unknown key 'patern'; did you mean 'pattern'?" in text
    assert "'rate' must be a number > 1, got 1.0 @ $.rules[0].rank" in text
    assert "'round_to' must be a positive int, got -8 @ $.rules[1].rank" in text
    assert "'rank' must be a positive int" in text


def test_rank_above_full_rank_names_the_layer(tiny_resnet, example_inputs):
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=17))])
    with pytest.raises(SpecError) as excinfo:
        compress(tiny_resnet, spec, example_inputs)
    text = problems_of(excinfo)
    assert "layer 'fc': rank 17 is outside 1..16 for decomposition 'svd'" in text
    assert "layer 'classifier': rank 17 is outside 1..10" in text


def test_ranks_naming_a_missing_layer(tiny_resnet, example_inputs):
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("fixed", ranks={"fc": 4, "fc2": 3, "classifier": None}))])
    with pytest.raises(SpecError) as excinfo:
        compress(tiny_resnet, spec, example_inputs)
    assert "layer 'fc2' is not matched by this rule; matched layers: classifier, fc" in str(
        excinfo.value)


def test_fixed_without_a_rank_for_a_layer(tiny_resnet, example_inputs):
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("fixed", ranks={"fc": 4}))])
    with pytest.raises(SpecError, match="layer 'classifier' has no rank"):
        compress(tiny_resnet, spec, example_inputs)


def test_unsupported_layer_type(tiny_resnet, example_inputs):
    spec = Spec(rules=[Rule(match=Match("glob", pattern="layer1.*"), decomposition="svd",
                            rank=RankRule("fixed", rank=2), unsupported="error")])
    with pytest.raises(SpecError) as excinfo:
        compress(tiny_resnet, spec, example_inputs)
    text = problems_of(excinfo)
    assert "layer 'layer1.conv1': decomposition 'svd' handles 1x1 convolutions only" in text
    assert "layer 'layer1.bn1': decomposition 'svd' does not support BatchNorm2d" in text
    assert "@ $.rules[0].decomposition" in text


def test_exclude_pattern_matching_nothing(tiny_resnet, example_inputs):
    spec = make_spec(exclude=["clasifier"])
    with pytest.raises(SpecError, match=r"exclude pattern 'clasifier' matches no layer.*\$\.exclude\[0\]"):
        compress(tiny_resnet, spec, example_inputs)


def test_errors_leave_the_model_untouched(tiny_resnet, example_inputs):
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=99))])
    with pytest.raises(SpecError):
        musco.Compressor(tiny_resnet, spec, example_inputs=example_inputs, inplace=True)
    assert isinstance(tiny_resnet.fc, nn.Linear)
    after = tiny_resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_spec_validate_without_a_model():
    make_spec().validate()
    with pytest.raises(SpecError, match="unknown decomposition 'tuker2'"):
        Spec(rules=[Rule(match="conv_kxk", decomposition="tuker2", rank="fixed")]).validate()


# -- gates and refiners: the new forms, the deprecated ones, the registry checks -----------------


RULE = dict(match="linear", decomposition="svd", rank=RankRule("param_reduction", rate=2.0))


def test_gates_and_refine_round_trip_in_the_new_form():
    spec = make_spec(rules=[Rule(**RULE, gates=["min_speedup",
                                                Gate("round_by_speed", multiple=8)])],
                     refine=Refine("model_output", steps=200, lr=1e-3))
    data = spec.to_dict()
    assert data["rules"][0]["gates"] == ["min_speedup", {"name": "round_by_speed", "multiple": 8}]
    assert data["refine"] == {"name": "model_output", "steps": 200, "lr": 1e-3}
    assert not {"min_speedup", "round_by_speed"} & set(data["rules"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new forms are not deprecated
        assert Spec.from_dict(data) == spec
        assert Spec.from_toml(spec.to_toml()) == spec
    assert "refine" not in make_spec().to_dict() and make_spec().refine is None
    assert make_spec(refine="layer_output").refine == Refine("layer_output")
    assert Spec.from_dict({**make_spec().to_dict(), "refine": "layer_output"}).refine == \
        Refine("layer_output")
    assert repr(Gate("min_speedup", factor=1.2)) == "Gate('min_speedup', factor=1.2)"


def test_gates_in_every_form():
    text = """
refine = { name = "model_output", steps = 200 }

[[rules]]
match = "linear"
decomposition = "svd"
rank = { name = "param_reduction", rate = 2.0 }
gates = ["round_by_speed", { name = "min_speedup", factor = 1.2 }]
"""
    spec = Spec.from_toml(text)
    assert spec.rules[0].gates == (Gate("round_by_speed"), Gate("min_speedup", factor=1.2))
    assert spec.refine == Refine("model_output", steps=200)
    assert Rule(**RULE, gates="min_speedup").gates == (Gate("min_speedup"),)
    assert Rule(**RULE, gates=[{"name": "min_speedup", "factor": 2.0}]).gates == \
        (Gate("min_speedup", factor=2.0),)
    yaml = pytest.importorskip("yaml")
    assert Spec.from_yaml(yaml.safe_dump(spec.to_dict())) == spec
    with pytest.raises(TypeError):
        Rule(**RULE, gates=[3])


def test_legacy_rule_options_load_as_gates_with_a_warning():
    new = Rule(**RULE, gates=[Gate("round_by_speed", multiple=8), Gate("min_speedup", factor=1.2)])
    with pytest.warns(DeprecationWarning) as record:
        old = Rule(**RULE, min_speedup=1.2, round_by_speed=8)
    assert old == new and old.min_speedup is None and old.round_by_speed is None
    messages = [str(w.message) for w in record]
    assert any("Rule(min_speedup=1.2)" in m and "Gate('min_speedup', factor=1.2)" in m
               and 'gates = [{ name = "min_speedup", factor = 1.2 }]' in m for m in messages)
    assert any("Gate('round_by_speed', multiple=8)" in m for m in messages)
    assert all(w.filename == __file__ for w in record)  # points at the caller
    with pytest.warns(DeprecationWarning, match="min_speedup"):
        assert Rule(**RULE, min_speedup=1.2) == Rule(**RULE, gates=[Gate("min_speedup", factor=1.2)])
    with pytest.warns(DeprecationWarning):  # appended after the gates given
        assert Rule(**RULE, gates=["x"], min_speedup=2).gates == (Gate("x"),
                                                                   Gate("min_speedup", factor=2.0))
    text = make_spec(rules=[new]).to_toml()
    legacy = text.replace('gates = [\n    { name = "round_by_speed", multiple = 8 },\n'
                          '    { name = "min_speedup", factor = 1.2 },\n]',
                          "min_speedup = 1.2\nround_by_speed = 8")
    assert legacy != text
    with pytest.warns(DeprecationWarning) as record:
        spec = Spec.from_toml(legacy)
    assert len(record) == 2 and all(w.filename == __file__ for w in record)
    assert spec == make_spec(rules=[new]) and spec.to_toml() == text
    with pytest.raises(ValueError, match="'min_speedup' must be > 0"):
        Rule(**RULE, min_speedup=-1.0)
    with pytest.raises(ValueError, match="'round_by_speed' must be a positive int"):
        Rule(**RULE, round_by_speed=0)
    for key, value, message in (
            ("min_speedup", 0, "'min_speedup' must be > 0.0: 0.0 @ $.rules[0]"),
            ("round_by_speed", -8, "'round_by_speed' must be a positive int or None, got -8 "
                                   "@ $.rules[0]")):
        data = make_spec().to_dict()
        data["rules"][0][key] = value
        with pytest.raises(SpecError) as excinfo:
            Spec.from_dict(data)
        assert excinfo.value.problems == [message]


def test_legacy_refine_loads_as_a_named_refiner_with_a_warning():
    with pytest.warns(DeprecationWarning) as record:
        old = Refine(steps=200, scope="model")
    assert old == Refine("model_output", steps=200) and not old.off
    (message,) = [str(w.message) for w in record]
    assert message == ("Refine(steps=200, scope='model') is deprecated; write "
                       "Refine('model_output', steps=200) (in TOML: refine = "
                       '{ name = "model_output", steps = 200 })')
    assert record[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="layer_output"):
        old = Refine(steps=10, lr=1e-3, seconds=5, seed=3)
    assert old == Refine("layer_output", steps=10, lr=1e-3, seconds=5.0, seed=3)
    for off in ({}, {"steps": 0}, {"steps": 0, "scope": "model"}, {"lr": 1e-3}):
        with pytest.warns(DeprecationWarning, match="refinement is off"):
            assert make_spec(refine=Refine(**off)).refine is None
    with pytest.raises(ValueError, match="'scope' must be in"):
        Refine(steps=2, scope="net")
    with pytest.raises(ValueError, match="'steps' must be >= 0"):
        Refine(steps=-1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stpes'; did you mean 'steps'"):
        Refine(stpes=2)


def test_legacy_refine_tables_load_in_every_form(tmp_path):
    base = make_spec().to_toml()
    with pytest.warns(DeprecationWarning) as record:
        spec = Spec.from_toml(base + '\n[refine]\nsteps = 200\nscope = "model"\n')
    assert spec == make_spec(refine=Refine("model_output", steps=200))
    (message,) = [str(w.message) for w in record]
    assert 'write refine = { name = "model_output", steps = 200 }' in message
    assert "Refine('model_output', steps=200)" in message
    assert spec.to_dict()["refine"] == {"name": "model_output", "steps": 200}
    with pytest.warns(DeprecationWarning, match="refinement is off"):
        assert Spec.from_toml(base + "\n[refine]\nlr = 0.01\n").refine is None
    yaml = pytest.importorskip("yaml")
    with pytest.warns(DeprecationWarning):
        spec = Spec.from_yaml(yaml.safe_dump({**make_spec().to_dict(),
                                              "refine": {"steps": 5, "scope": "layer"}}))
    assert spec.refine == Refine("layer_output", steps=5)
    path = tmp_path / "spec.json"
    path.write_text('{"rules": [{"match": "linear", "decomposition": "svd", "rank": "fixed"}],'
                    ' "refine": {"steps": 1, "scope": "layer", "seed": 1.5}}')
    with pytest.raises(SpecError, match=r"spec\.json: expected an integer, got 1\.5 @ \$\.refine\.seed"):
        Spec.load(path)


def test_unknown_gate_and_refiner_names_are_spec_errors_with_suggestions():
    spec = make_spec(rules=[Rule(**RULE, gates=[Gate("min_speedup", factor=1.1),
                                                Gate("round_by_sped", multiple=8)])],
                     refine=Refine("model_outptu", steps=2))
    with pytest.raises(SpecError) as excinfo:
        spec.validate()
    text = problems_of(excinfo)
    assert "unknown gate 'round_by_sped'; did you mean 'round_by_speed'?" in text
    assert "@ $.rules[0].gates[1]" in text
    assert "unknown refiner 'model_outptu'; did you mean 'model_output'? " in text
    assert text.endswith("@ $.refine")
    assert len(excinfo.value.problems) == 2
    make_spec(rules=[Rule(**RULE, gates=[Gate("min_speedup", factor=1.1)])],
              refine=Refine("layer_output", steps=1)).validate()
    with pytest.raises(SpecError, match=r"required key missing @ \$\.rules\[0\]\.gates\[0\]\.factor"):
        make_spec(rules=[Rule(**RULE, gates=["min_speedup"])]).validate()


def test_first_party_gates_and_refiners_bind():
    spec = make_spec(rules=[Rule(**RULE, gates=[Gate("round_by_speed", multiple=8),
                                                Gate("min_speedup", factor=1.2)])],
                     refine=Refine("model_output", steps=3))
    (rule,) = resolve_rules(spec)
    assert [g.name for g in rule.gates] == ["round_by_speed", "min_speedup"]
    assert rule.gates[1].params.factor == 1.2 and rule.gates[0].params.multiple == 8
    refiner = resolve_refine(spec)
    assert refiner.name == "model_output" and refiner.params.steps == 3
    assert resolve_refine(make_spec(refine=Refine("model_output", steps=0))) is None
    assert resolve_refine(make_spec()) is None
    bad = make_spec(refine=Refine("layer_output", stpes=3))
    with pytest.raises(SpecError, match=r"unknown key 'stpes'; did you mean 'steps'\?.* @ \$\.refine"):
        bad.validate()


# A test plugin: a decomposition that needs statistics, a statistic, a gate and a refiner.


class _NeedyDecomposition(musco.Decomposition):
    name = "needy_svd"
    module_types = (nn.Linear,)

    @attrs.frozen
    class Params:
        need: str = "input_abs_maks"

    def needs(self, params):
        return frozenset({params.need})


class _AbsMax(Statistic):
    name = "input_abs_max"


class _PickyGate(GateStrategy):
    name = "picky"

    @attrs.frozen
    class Params:
        limit: int = 1

    def problems(self, params, rank_rule, limits):
        return [f"'limit' {params.limit} is too high for rank rule {rank_rule.name!r}"] \
            if params.limit > 2 else []


class _CountingRefiner(Refiner):
    name = "counting"

    @attrs.frozen
    class Params:
        steps: int = 1

    def enabled(self, params):
        return params.steps > 0


class _TestPlugin:
    @musco.hookimpl
    def musco_add_decompositions(self, register):
        register(_NeedyDecomposition())

    @musco.hookimpl
    def musco_add_statistics(self, register):
        register(_AbsMax(), aliases=["abs_max"])

    @musco.hookimpl
    def musco_add_gates(self, register):
        register(_PickyGate())

    @musco.hookimpl
    def musco_add_refiners(self, register):
        register(_CountingRefiner())


@pytest.fixture
def test_registry():
    registry = musco.Registry(autoload=True)
    registry.register_plugin(_TestPlugin())
    return registry


def test_an_unknown_statistic_in_needs_is_a_spec_error(test_registry):
    spec = make_spec(rules=[Rule(match="linear", decomposition="needy_svd", rank="fixed")])
    with pytest.raises(SpecError) as excinfo:
        spec.validate(registry=test_registry)
    (problem,) = excinfo.value.problems
    assert problem.startswith("unknown statistic 'input_abs_maks' needed by decomposition "
                              "'needy_svd'; did you mean 'input_abs_max'? (available: ")
    assert problem.endswith("@ $.rules[0].decomposition")
    for known in ("input_abs_max", "abs_max"):  # a name or an alias
        spec = make_spec(rules=[Rule(match="linear", decomposition=Decompose("needy_svd", need=known),
                                     rank="fixed")])
        spec.validate(registry=test_registry)


def test_gate_problems_and_refiners_from_a_plugin(test_registry):
    spec = make_spec(rules=[Rule(**RULE, gates=[Gate("picky", limit=1), Gate("picky", limit=3),
                                                Gate("picky", limt=1), "pciky"])],
                     refine=Refine("countng"))
    with pytest.raises(SpecError) as excinfo:
        spec.validate(registry=test_registry)
    problems = excinfo.value.problems
    assert ("'limit' 3 is too high for rank rule 'param_reduction' @ $.rules[0].gates[1]"
            in problems)
    assert any(p.startswith("unknown key 'limt'; did you mean 'limit'?")
               and p.endswith("@ $.rules[0].gates[2]") for p in problems)
    assert any(p.startswith("unknown gate 'pciky'; did you mean 'picky'?")
               and p.endswith("@ $.rules[0].gates[3]") for p in problems)
    assert any(p.startswith("unknown refiner 'countng'; did you mean 'counting'?")
               and p.endswith("@ $.refine") for p in problems)
    assert len(problems) == 4
    spec = make_spec(rules=[Rule(**RULE, gates=["picky"])], refine="counting")
    spec.validate(registry=test_registry)
    (rule,) = resolve_rules(spec, test_registry)
    assert rule.gates[0].name == "picky" and rule.gates[0].params.limit == 1
    assert resolve_refine(spec, test_registry).params.steps == 1
    assert resolve_refine(make_spec(refine=Refine("counting", steps=0)), test_registry) is None


def test_resolve_does_not_import_the_spec_module_at_runtime():
    import ast
    import inspect

    import musco_core.resolve

    tree = ast.parse(inspect.getsource(musco_core.resolve))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(getattr(n, "module", "") in ("musco_core.spec", "musco_core.plan")
                   for n in top)
