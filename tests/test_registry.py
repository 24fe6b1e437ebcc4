"""The registry: entry-point discovery, environment switches, registration errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core import PluginError, Registry
from musco_core import registry as musco_registry

PLUGIN_SOURCE = '''
"""A third-party musco plugin: a matcher and a decomposition."""
import torch
from torch import nn
import musco_core


class WideLinear(musco_core.Matcher):
    name = "wide_linear"
    summary = "Linear layers with more inputs than outputs"

    def matches(self, name, module, params):
        return isinstance(module, nn.Linear) and module.in_features > module.out_features


class Truncate(musco_core.Decomposition):
    """Keeps the first `rank` output rows of a Linear weight, padding the rest with zeros."""
    name = "row_truncate"
    module_types = (nn.Linear,)

    def full_rank(self, module):
        return module.out_features

    def param_count(self, module, rank):
        return rank * module.in_features + module.out_features

    def weight(self, module):
        return module.weight

    def decompose(self, weight, rank, params):
        return weight[:rank].clone(), weight.shape[0]

    def reconstruct(self, factors):
        rows, out = factors
        return torch.cat([rows, rows.new_zeros(out - rows.shape[0], rows.shape[1])])

    def build(self, module, factors):
        new = nn.Linear(module.in_features, module.out_features, dtype=module.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(self.reconstruct(factors))
            new.bias.copy_(module.bias)
        return new


@musco_core.hookimpl
def musco_add_matchers(register):
    register(WideLinear())


@musco_core.hookimpl
def musco_add_decompositions(register):
    register(Truncate(), aliases=["rowtrunc"])
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A distribution 'musco-thirdparty' installed the way pip lays it out (module + dist-info)."""
    (tmp_path / "musco_thirdparty.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "musco_thirdparty-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: musco-thirdparty\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[musco]\nthirdparty = musco_thirdparty\n")
    (info / "top_level.txt").write_text("musco_thirdparty\n")
    (info / "RECORD").write_text("musco_thirdparty.py,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "thirdparty"
    sys.modules.pop("musco_thirdparty", None)


def test_third_party_strategies_are_found_by_name_from_a_spec(third_party):
    registry = Registry()
    found = {row["name"]: row for row in registry.available()["decompositions"]}
    assert found["row_truncate"]["distribution"] == "musco-thirdparty"
    assert found["svd"]["distribution"] == "musco"
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 12))
    spec = musco.Spec.from_toml(textwrap.dedent("""
        [[rules]]
        match = "wide_linear"
        decomposition = "rowtrunc"
        rank = { name = "fixed", rank = 2 }
    """))
    compressor = musco.Compressor(model, spec, torch.randn(1, 8), registry=registry)
    assert compressor.plan.layers == ("0",)
    report = compressor.step()
    assert report.layers[0].decomposition == "row_truncate"
    assert torch.count_nonzero(compressor.model[0].weight[2:]) == 0


def test_disable_autoload_keeps_first_party_only(third_party, monkeypatch):
    monkeypatch.setenv("MUSCO_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = Registry().names("decompositions")
    assert "svd" in names and "row_truncate" not in names


def test_block_plugins(third_party, monkeypatch):
    monkeypatch.setenv("MUSCO_BLOCK_PLUGINS", f" other , {third_party}")
    with pytest.warns(musco_registry.PluginWarning, match="names 'other', which is not"):
        registry = Registry()
    assert "row_truncate" not in registry.names("decompositions")
    assert registry.pm.is_blocked(third_party)


def test_trace_plugins_writes_hook_calls_to_stderr(monkeypatch, capsys):
    monkeypatch.setenv("MUSCO_TRACE_PLUGINS", "1")
    Registry().names("matchers")
    assert "musco_add_matchers" in capsys.readouterr().err


def install_fake(tmp_path, monkeypatch, dist: str, entry_point: str, module: str,
                 source: str | None) -> None:
    """A distribution ``dist`` with one ``musco`` entry point, laid out as pip would."""
    if source is not None:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[musco]\n{entry_point} = {module}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_broken_entry_point_is_reported_and_skipped(tmp_path, monkeypatch):
    install_fake(tmp_path, monkeypatch, "musco-broken", "broken", "musco_no_such_module", None)
    with pytest.warns(musco_registry.PluginWarning,
                      match="'broken'.*musco-broken.*skipped.*MUSCO_BLOCK_PLUGINS=broken"):
        registry = Registry()
    assert [(b.name, b.distribution) for b in registry.broken] == [("broken", "musco-broken")]
    assert "No module named 'musco_no_such_module'" in registry.broken[0].error
    assert "svd" in registry.names("decompositions")
    monkeypatch.setenv("MUSCO_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'broken'.*musco-broken.*MUSCO_STRICT_PLUGINS"):
        Registry()
    monkeypatch.setenv("MUSCO_BLOCK_PLUGINS", "broken")
    assert "svd" in Registry().names("decompositions")


RAISING_PLUGIN = """
    import musco_core

    class Half(musco_core.Decomposition):
        name = "half_registered"

    @musco_core.hookimpl
    def musco_add_decompositions(register):
        register(Half())

    @musco_core.hookimpl
    def musco_add_matchers(register):
        raise RuntimeError("boom in a third-party hook")
"""


def test_a_hook_that_raises_is_attributed_and_skipped(tmp_path, monkeypatch):
    install_fake(tmp_path, monkeypatch, "musco-raising", "raising", "musco_raising",
                 RAISING_PLUGIN)
    registry = Registry()
    with pytest.warns(musco_registry.PluginWarning,
                      match="'raising' from distribution 'musco-raising'.*"
                            "RuntimeError: boom in a third-party hook"):
        table = registry.available()
    names = {row["name"] for row in table["decompositions"]}
    assert "svd" in names and "half_registered" not in names  # nothing half-registered
    assert [(b.name, b.distribution) for b in registry.broken] == [("raising", "musco-raising")]
    assert not registry.pm.has_plugin("raising")  # none of its other hooks run either
    model = nn.Sequential(nn.Linear(8, 6))
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=2))])
    assert musco.Compressor(model, spec, torch.randn(1, 8), registry=registry).plan.layers == ("0",)

    monkeypatch.setenv("MUSCO_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'raising'.*musco-raising.*boom"):
        Registry().available()


def test_a_plugin_registering_something_invalid_is_skipped(tmp_path, monkeypatch):
    install_fake(tmp_path, monkeypatch, "musco-invalid", "invalid", "musco_invalid", """
        import musco_core

        @musco_core.hookimpl
        def musco_add_rank_rules(register):
            register(object())

        @musco_core.hookimpl
        def musco_add_nothing(register):  # a misspelled hook
            pass
    """)
    with pytest.warns(musco_registry.PluginWarning, match="'invalid'.*musco_add_nothing"):
        registry = Registry()
    assert "fixed" in registry.names("rank_rules")
    assert [b.name for b in registry.broken] == ["invalid"]


def test_unknown_names_in_block_plugins_are_warned_about(monkeypatch):
    monkeypatch.setenv("MUSCO_BLOCK_PLUGINS", "musco_sdt")
    with pytest.warns(musco_registry.PluginWarning,
                      match="MUSCO_BLOCK_PLUGINS names 'musco_sdt'.*did you mean 'musco_std'"):
        Registry()


def test_an_uninstalled_checkout_says_how_to_install(monkeypatch):
    monkeypatch.setattr(musco_registry.metadata, "entry_points", lambda group: [])
    with pytest.raises(PluginError, match=r"not installed.*pip install -e \."):
        Registry()


def test_a_params_field_called_name_is_refused():
    import attrs

    @attrs.frozen
    class NamedParams:
        name: str = "x"

    class Named(musco.Matcher):
        name = "named"
        Params = NamedParams

    class Plugin:
        @musco.hookimpl
        def musco_add_matchers(self, register):
            register(Named())

    registry = Registry(autoload=False)
    registry.register_plugin(Plugin())
    with pytest.raises(PluginError, match="Params has a field called 'name'"):
        registry.names("matchers")


class _Dup(musco.Decomposition):
    name = "svd"


def test_musco_add_decompositions():
    class Plugin:
        @musco.hookimpl
        def musco_add_decompositions(self, register):
            register(_Dup())

    registry = Registry()
    plugin = Plugin()
    registry.register_plugin(plugin)
    try:
        with pytest.raises(PluginError, match="decomposition name 'svd' registered twice"):
            registry.names("decompositions")
    finally:
        registry.unregister_plugin(plugin)
    assert registry.get("decompositions", "svd").distribution == "musco"


def test_musco_add_rank_rules():
    class Plugin:
        @musco.hookimpl
        def musco_add_rank_rules(self, register):
            register(_Dup())  # a decomposition is not a rank rule

    registry = Registry(autoload=False)
    registry.register_plugin(Plugin())
    with pytest.raises(PluginError, match="must be an instance of musco_core.RankSelector"):
        registry.names("rank_rules")


def test_musco_add_matchers():
    class Everything(musco.Matcher):
        name = "everything"

        def matches(self, name, module, params):
            return True

    class Plugin:
        @musco.hookimpl
        def musco_add_matchers(self, register):
            register(Everything(), aliases=("all",))

    registry = Registry(autoload=False)
    registry.register_plugin(Plugin())
    assert registry.get("matchers", "all").name == "everything"
    assert registry.get("matchers", "all").distribution is None  # defined in a test, not installed
    with pytest.raises(KeyError, match="unknown matcher 'everythin'; did you mean 'everything'"):
        registry.get("matchers", "everythin")


def test_misspelled_hook_names_are_caught_at_registration():
    class Plugin:
        @musco.hookimpl
        def musco_add_decomposition(self, register):  # missing "s"
            pass

    with pytest.raises(Exception, match="musco_add_decomposition"):
        Registry(autoload=False).register_plugin(Plugin())


def test_available_lists_every_kind_with_its_distribution():
    table = musco.available()
    assert set(table) == {"decompositions", "rank_rules", "matchers", "statistics", "refiners",
                          "costs", "gates", "flop_formulas"}
    matchers = {row["name"] for row in table["matchers"]}
    assert {"linear", "conv1x1", "conv_kxk", "glob", "regex"} <= matchers
    assert all(row["distribution"] == "musco" for row in table["rank_rules"])
