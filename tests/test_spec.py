"""The spec: construction, dict/TOML/YAML round trips, and an error for every bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import musco_core as musco
from musco_core import Decompose, Match, RankRule, Rule, Spec, SpecError


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
specs = st.builds(
    Spec,
    rules=st.lists(
        st.builds(Rule, match=st.lists(st.one_of(names, globs), min_size=1, max_size=3),
                  decomposition=st.just("svd"), rank=ranks),
        min_size=1, max_size=3),
    exclude=st.lists(st.sampled_from(["fc", "head.*", "*.bn"]), max_size=2),
    layers_per_step=st.integers(1, 10),
    rounds=st.integers(1, 3),
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
    (("exclude",), {"a": 1}, r"expected a glob pattern or a list of them, got \{'a': 1\} @ \$\.exclude"),
    (("calibration",), {"max_batches": 2.5}, r"expected an integer, got 2\.5 @ \$\.calibration\.max_batches"),
    (("refine",), {"lr": "0.1"}, r"expected a number, got '0\.1' @ \$\.refine\.lr"),
    (("refine",), 3, r"expected a table \(mapping\) for Refine, got 3 @ \$\.refine"),
])
def test_values_are_not_coerced(path, value, message):
    data = make_spec().to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SpecError, match=message):
        Spec.from_dict(data)


def test_an_int_is_accepted_where_a_float_is():
    data = make_spec().to_dict()
    data["rules"][0]["min_speedup"] = 1
    data["refine"] = {"lr": 1}
    spec = Spec.from_dict(data)
    assert spec.rules[0].min_speedup == 1.0 and isinstance(spec.rules[0].min_speedup, float)
    assert spec.refine.lr == 1.0 and isinstance(spec.refine.lr, float)
    assert Rule(match="linear", decomposition="svd", rank="fixed", min_speedup=2).min_speedup == 2.0


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
