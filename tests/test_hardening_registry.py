"""Registry hardening: first-party names cannot be taken, overriding is an explicit opt-in,
and broken plugins are known as soon as a registry exists."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core import PluginError, Registry
from musco_core.registry import PluginWarning


def install_fake(directory, monkeypatch, dist: str, entry_point: str, module: str,
                 source: str) -> None:
    """A distribution ``dist`` with one ``musco`` entry point, laid out as pip would, in a
    directory put at the front of ``sys.path`` (so it is found before the installed ``musco``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(textwrap.dedent(source))
    info = directory / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[musco]\n{entry_point} = {module}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, module, raising=False)


SQUATTER = """
    import musco_core
    from torch import nn

    class NotSVD(musco_core.Decomposition):
        name = "svd"
        summary = "a third-party strategy that wants the first-party name"
        module_types = (nn.Linear,)

    class SquatMatcher(musco_core.Matcher):
        name = "squat_matcher"

        def matches(self, name, module, params):
            return False

    @musco_core.hookimpl
    def musco_add_decompositions(register):
        register(NotSVD())

    @musco_core.hookimpl
    def musco_add_matchers(register):
        register(SquatMatcher())
"""


def _spec(rank: int = 2) -> musco.Spec:
    return musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=rank))])


def _step(registry: Registry) -> musco.Compressor:
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    compressor = musco.Compressor(model, _spec(), torch.randn(2, 8), registry=registry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", musco.MuscoWarning)
        compressor.step()
    return compressor


def test_a_third_party_plugin_found_first_cannot_take_a_first_party_name(tmp_path, monkeypatch):
    install_fake(tmp_path, monkeypatch, "musco-squatter", "squatter", "musco_squatter", SQUATTER)
    with pytest.warns(PluginWarning) as record:
        registry = Registry()
        registry.entries  # noqa: B018 - collecting registers
    # first-party strategies load first, whatever the order on sys.path
    assert registry.pm.list_name_plugin()[0][0] == "musco_std"
    entry = registry.get("decompositions", "svd")
    assert entry.distribution == "musco"
    assert type(entry.strategy).__module__.startswith("musco_std")
    # the squatter is skipped as a whole, with a warning naming both distributions
    assert [(b.name, b.distribution) for b in registry.broken] == [("squatter", "musco-squatter")]
    error = registry.broken[0].error
    assert "'svd'" in error and "'musco'" in error and "'musco-squatter'" in error
    assert "override=True" in error
    assert any("squatter" in str(w.message) and "'svd'" in str(w.message) for w in record)
    assert "squat_matcher" not in registry.names("matchers")
    # and musco keeps working
    compressor = _step(registry)
    assert type(compressor.model[0]).__module__.startswith("musco_std")


HALF = """
    import musco_core

    class Half(musco_core.RankSelector):
        name = "half"
        summary = "{summary}"

        def select(self, layer, params):
            return 1

    class Extra(musco_core.RankSelector):
        name = "{extra}"

        def select(self, layer, params):
            return 1

    @musco_core.hookimpl
    def musco_add_rank_rules(register):
        register(Half())
        register(Extra())
"""


def test_two_third_party_plugins_with_the_same_rank_rule_name_are_not_silent(tmp_path,
                                                                             monkeypatch):
    install_fake(tmp_path / "a", monkeypatch, "musco-alpha", "alpha", "musco_alpha",
                 HALF.format(summary="alpha's half", extra="alpha_only"))
    install_fake(tmp_path / "b", monkeypatch, "musco-beta", "beta", "musco_beta",
                 HALF.format(summary="beta's half", extra="beta_only"))
    with pytest.warns(PluginWarning, match="'half'") as record:
        registry = Registry()
        registry.entries  # noqa: B018
    assert len(registry.broken) == 1
    loser = registry.broken[0]
    winner = {"musco-alpha": "musco-beta", "musco-beta": "musco-alpha"}[loser.distribution]
    assert registry.get("rank_rules", "half").distribution == winner
    assert f"'{winner}'" in loser.error and f"'{loser.distribution}'" in loser.error
    # skipped as a whole: its other rank rule is not registered either
    names = registry.names("rank_rules")
    assert f"{winner.split('-')[1]}_only" in names
    assert f"{loser.distribution.split('-')[1]}_only" not in names
    assert "fixed" in names
    assert any(loser.name in str(w.message) for w in record)


OVERRIDE = """
    import musco_core
    from musco_std.svd import SVD

    CALLS = []

    class FastSVD(SVD):
        summary = "svd, replaced on purpose"

        def build(self, module, factors):
            CALLS.append(factors[0].shape[0])
            return super().build(module, factors)

    @musco_core.hookimpl
    def musco_add_decompositions(register):
        register(FastSVD(), override=True)
"""


def test_an_override_replaces_a_first_party_strategy_and_is_listed(tmp_path, monkeypatch):
    install_fake(tmp_path, monkeypatch, "musco-fastsvd", "fastsvd", "musco_fastsvd", OVERRIDE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        registry = Registry()
        registry.entries  # noqa: B018
    assert registry.broken == []
    entry = registry.get("decompositions", "svd")
    assert type(entry.strategy).__name__ == "FastSVD"
    assert entry.distribution == "musco-fastsvd"
    rows = {row["name"]: row for row in registry.available()["decompositions"]}
    assert rows["svd"]["distribution"] == "musco-fastsvd"
    assert rows["svd"]["overrides"] == {"name": "svd", "distribution": "musco"}
    assert rows["tucker2"]["overrides"] is None
    _step(registry)
    assert sys.modules["musco_fastsvd"].CALLS  # the replacement did the work


def test_two_overrides_of_one_name_are_a_clash(tmp_path, monkeypatch):
    install_fake(tmp_path / "a", monkeypatch, "musco-fastsvd", "fastsvd", "musco_fastsvd",
                 OVERRIDE)
    install_fake(tmp_path / "b", monkeypatch, "musco-fastsvd2", "fastsvd2", "musco_fastsvd2",
                 OVERRIDE)
    with pytest.warns(PluginWarning, match="'svd'"):
        registry = Registry()
        registry.entries  # noqa: B018
    assert len(registry.broken) == 1
    loser = registry.broken[0]
    assert "'musco-fastsvd'" in loser.error and "'musco-fastsvd2'" in loser.error
    assert registry.get("decompositions", "svd").distribution != loser.distribution


class _Fixed(musco.RankSelector):
    name = "fixed"
    summary = "my own fixed rank"

    def select(self, layer, params):
        return 1


def _plugin(**register_kwargs):
    class Plugin:
        @musco.hookimpl
        def musco_add_rank_rules(self, register):
            register(_Fixed(), **register_kwargs)

    return Plugin()


def test_a_plugin_registered_by_hand_that_takes_a_name_is_an_error_naming_both():
    registry = Registry()
    registry.register_plugin(_plugin(), name="mine")
    with pytest.raises(PluginError, match=r"rank rule name 'fixed'.*'musco'.*override=True"):
        registry.entries  # noqa: B018


def test_a_plugin_registered_by_hand_may_override():
    registry = Registry()
    registry.register_plugin(_plugin(override=True), name="mine")
    entry = registry.get("rank_rules", "fixed")
    assert isinstance(entry.strategy, _Fixed)
    row = next(r for r in registry.available()["rank_rules"] if r["name"] == "fixed")
    assert row["overrides"] == {"name": "fixed", "distribution": "musco"}
    registry.unregister_plugin(name="mine")
    assert not isinstance(registry.get("rank_rules", "fixed").strategy, _Fixed)


def test_an_override_of_a_free_name_just_registers_it():
    class Free(musco.RankSelector):
        name = "free_rule"

        def select(self, layer, params):
            return 1

    class Plugin:
        @musco.hookimpl
        def musco_add_rank_rules(self, register):
            register(Free(), aliases=["free"], override=True)

    registry = Registry()
    registry.register_plugin(Plugin())
    assert registry.get("rank_rules", "free").name == "free_rule"
    row = next(r for r in registry.available()["rank_rules"] if r["name"] == "free_rule")
    assert row["overrides"] is None


RAISING = """
    import musco_core

    @musco_core.hookimpl
    def musco_add_matchers(register):
        raise RuntimeError("boom at registration")
"""


def test_broken_plugins_are_known_right_after_construction(tmp_path, monkeypatch):
    install_fake(tmp_path, monkeypatch, "musco-raising2", "raising2", "musco_raising2", RAISING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        registry = Registry()
        assert [(b.name, b.distribution) for b in registry.broken] == [
            ("raising2", "musco-raising2")]
        assert "boom at registration" in registry.broken[0].error
    assert not registry.pm.has_plugin("raising2")
    # the warning is given when the strategies are first used, once
    with pytest.warns(PluginWarning, match="'raising2'.*boom at registration"):
        assert "svd" in registry.names("decompositions")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        registry.names("matchers")


def test_an_empty_registry_stays_empty_and_cheap():
    registry = Registry(autoload=False)
    assert registry.broken == []
    assert registry.names("decompositions") == []
