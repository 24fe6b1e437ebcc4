"""The strategy registry: a pluggy plugin manager filled from the ``musco`` entry points.

Environment switches (read when a registry is created):

``MUSCO_DISABLE_PLUGIN_AUTOLOAD=1``
    load entry points of the ``musco`` distribution itself (the first-party
    strategies) but no third-party ones.
``MUSCO_BLOCK_PLUGINS=a,b``
    do not load the entry points (plugins) named ``a`` and ``b``.
``MUSCO_TRACE_PLUGINS=1``
    write every hook call to stderr.
``MUSCO_STRICT_PLUGINS=1``
    a broken third-party plugin is an error (:class:`PluginError`) instead of a
    warning.

The first-party plugin (the entry points of the ``musco`` distribution) loads
first, wherever it is on ``sys.path``; third-party plugins follow in entry-point
order, then plugins registered with :meth:`Registry.register_plugin`.

A third-party plugin that fails to import, raises in a registration hook,
registers something invalid, or registers a name (or alias) that an earlier
plugin registered is *broken*: it is skipped as a whole (unregistered), a
:class:`PluginWarning` names it and its distribution (for a name clash, both
distributions), and :attr:`Registry.broken` and ``musco plugins`` list it.
Specs that use only working strategies keep working. Plugins you register
yourself with :meth:`Registry.register_plugin`, and the first-party plugin,
raise :class:`PluginError` instead.

Replacing a strategy on purpose is an opt-in: ``register(strategy,
override=True)`` takes over the names and aliases of the strategy registered
under the same name (or alias) before; :meth:`Registry.available` lists the
replacement with its distribution and what it overrides. Only one plugin may
replace a given strategy: a second override of it is a clash.

``Registry()`` collects every plugin's strategies when it is created, so
:attr:`Registry.broken` is complete right away; the warning about a plugin whose
registration hooks failed is given when the strategies are first used.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import attrs
import pluggy

from musco_core import hookspecs
from musco_core.errors import PluginError
from musco_core.strategies import (
    Cost, Decomposition, FlopFormula, GateStrategy, Matcher, RankSelector, Refiner, Statistic, Strategy,
)

ENTRY_POINT_GROUP = "musco"
FIRST_PARTY_DISTRIBUTION = "musco"

#: kind -> (hook name, base class, human-readable name)
KINDS: dict[str, tuple[str, type[Strategy], str]] = {
    "decompositions": ("musco_add_decompositions", Decomposition, "decomposition"),
    "rank_rules": ("musco_add_rank_rules", RankSelector, "rank rule"),
    "matchers": ("musco_add_matchers", Matcher, "matcher"),
    "statistics": ("musco_add_statistics", Statistic, "statistic"),
    "refiners": ("musco_add_refiners", Refiner, "refiner"),
    "costs": ("musco_add_costs", Cost, "cost"),
    "gates": ("musco_add_gates", GateStrategy, "gate"),
    "flop_formulas": ("musco_add_flop_formulas", FlopFormula, "FLOP formula"),
}


@attrs.frozen
class Entry:
    """A registered strategy and where it came from.

    ``replaces`` is the entry it took the name of, when it was registered with
    ``override=True`` over an earlier one.
    """

    name: str
    strategy: Strategy
    distribution: str | None
    aliases: tuple[str, ...] = ()
    replaces: Entry | None = None


@attrs.frozen
class BrokenPlugin:
    """A plugin that was skipped: its entry-point name, distribution and what went wrong."""

    name: str
    distribution: str | None
    error: str


class PluginWarning(UserWarning):
    """A plugin was skipped, or a plugin switch names no installed plugin."""


INSTALL_HINT = (
    "no first-party musco strategies were found: the 'musco' distribution is not installed "
    "(its entry points are missing), e.g. in a source checkout. Install it with "
    "`pip install -e .` in the checkout (or `pip install musco`)"
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _distribution_of(obj: Any, packages: dict[str, list[str]]) -> str | None:
    """The installed distribution that ships the module defining ``obj``'s class."""
    module = type(obj).__module__ or ""
    dists = packages.get(module.split(".")[0])
    return dists[0] if dists else None


def _ep_distribution(ep: Any) -> str | None:
    return ep.dist.name if ep.dist is not None else None


def _origin(strategy: Any, dist: str | None) -> str:
    """``"SVD from distribution 'musco'"``: who registered a strategy, for messages."""
    where = f"from distribution {dist!r}" if dist else "(not from an installed distribution)"
    return f"{type(strategy).__name__} {where}"


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix, or the list of valid choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(value, choices, n=1)
    if close:
        return f"did you mean {close[0]!r}? (available: {', '.join(choices)})"
    return f"available: {', '.join(choices) or 'none'}"


class Registry:
    """Strategies by kind and name, filled by the ``musco_add_*`` hooks of the loaded plugins.

    ``Registry()`` loads the entry points of the ``musco`` group (subject to the
    environment switches). ``Registry(autoload=False)`` starts empty; add plugins
    with :meth:`register_plugin`.
    """

    def __init__(self, *, autoload: bool = True):
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self._entries: dict[str, dict[str, Entry]] | None = None
        #: Third-party plugins that were skipped because they failed (see the module docs).
        self.broken: list[BrokenPlugin] = []
        # Entry-point plugins whose failures are isolated: name -> distribution.
        self._isolated: dict[str, str | None] = {}
        # Every plugin loaded from an entry point (first-party too): name -> distribution.
        self._sources: dict[str, str | None] = {}
        # Warnings about broken plugins found while the registry was created, given on first use.
        self._deferred: list[str] = []
        self.strict = _env_flag("MUSCO_STRICT_PLUGINS")
        if _env_flag("MUSCO_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        blocked = os.environ.get("MUSCO_BLOCK_PLUGINS", "")
        blocked_names = list(filter(None, (n.strip() for n in blocked.split(","))))
        for name in blocked_names:
            self.pm.set_blocked(name)
        if autoload:
            self._load_entry_points(first_party_only=_env_flag("MUSCO_DISABLE_PLUGIN_AUTOLOAD"),
                                    blocked=blocked_names)
            # Collect now, so that `broken` is complete as soon as the registry exists.
            self._entries = self._collect(defer=True)

    def _load_entry_points(self, *, first_party_only: bool, blocked: list[str]) -> None:
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        known = sorted({ep.name for ep in eps})
        for name in blocked:
            if name not in known:
                warnings.warn(
                    f"MUSCO_BLOCK_PLUGINS names {name!r}, which is not an installed musco "
                    f"plugin; {did_you_mean(name, known)}", PluginWarning, stacklevel=3)
        if not any(_ep_distribution(ep) == FIRST_PARTY_DISTRIBUTION for ep in eps):
            raise PluginError(INSTALL_HINT)
        # First-party plugins first, whatever the order on sys.path: a third-party plugin
        # found earlier must not take their names (it may replace one only with override=True).
        eps.sort(key=lambda ep: _ep_distribution(ep) != FIRST_PARTY_DISTRIBUTION)
        for ep in eps:
            dist = _ep_distribution(ep)
            if first_party_only and dist != FIRST_PARTY_DISTRIBUTION:
                continue
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                if dist == FIRST_PARTY_DISTRIBUTION:
                    self.register_plugin(plugin, name=ep.name)
                    self._sources[ep.name] = dist
                    continue
                self.pm.register(plugin, name=ep.name)
                self.pm.check_pending()
            except Exception as exc:
                if self.pm.has_plugin(ep.name):
                    self.pm.unregister(name=ep.name)
                message = (f"could not load musco plugin {ep.name!r} ({ep.value}) from "
                           f"distribution {dist!r}: {type(exc).__name__}: {exc}")
                if dist == FIRST_PARTY_DISTRIBUTION:
                    raise PluginError(message) from exc
                self._mark_broken(ep.name, dist, message, exc)
                continue
            self._isolated[ep.name] = dist
            self._sources[ep.name] = dist
            self._entries = None

    def _mark_broken(self, name: str, dist: str | None, message: str, exc: BaseException,
                     defer: bool = False) -> None:
        """Skip a failed third-party plugin: warn (now or on first use), list it, or raise
        in strict mode."""
        if self.strict:
            raise PluginError(f"{message} (MUSCO_STRICT_PLUGINS is set; block it with "
                              f"MUSCO_BLOCK_PLUGINS={name})") from exc
        self.broken.append(BrokenPlugin(name=name, distribution=dist, error=message))
        text = (f"{message}; the plugin was skipped (block it with MUSCO_BLOCK_PLUGINS={name}, "
                "or set MUSCO_STRICT_PLUGINS=1 to make this an error)")
        if defer:
            self._deferred.append(text)
        else:
            warnings.warn(text, PluginWarning, stacklevel=4)

    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object (a module or an instance with hook implementations)."""
        registered = self.pm.register(plugin, name=name)
        if registered is None:  # blocked
            return name or ""
        self.pm.check_pending()
        self._entries = None
        return registered

    def unregister_plugin(self, plugin: Any = None, name: str | None = None) -> None:
        """Remove a plugin registered with :meth:`register_plugin`."""
        self.pm.unregister(plugin=plugin, name=name)
        self._entries = None

    @property
    def entries(self) -> dict[str, dict[str, Entry]]:
        """``{kind: {name_or_alias: Entry}}``, collected from the plugins (again after a
        plugin is registered or unregistered)."""
        if self._entries is None:
            self._entries = self._collect()
        while self._deferred:
            warnings.warn(self._deferred.pop(0), PluginWarning, stacklevel=3)
        return self._entries

    def _collect(self, defer: bool = False) -> dict[str, dict[str, Entry]]:
        """Call every plugin's registration hooks, one plugin at a time, in load order.

        A plugin's strategies are added only when all its hooks succeed, so a
        broken plugin (see the module docs) leaves nothing half-registered. With
        ``defer`` the warnings about broken plugins wait for the first use of
        :attr:`entries`.
        """
        entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        packages: dict[str, list[str]] | None = None
        plugins = self.pm.list_name_plugin()
        for name, plugin in plugins:
            if plugin is None or not self.pm.is_registered(plugin):
                continue
            if name in self._sources:
                # An entry-point plugin's strategies belong to its distribution.
                def distribution(strategy: Any, _d=self._sources[name]) -> str | None:
                    return _d
            else:
                # A plugin registered by hand: the distribution shipping each strategy's
                # class, if any (packages_distributions reads every installed RECORD, so
                # only here).
                packages = metadata.packages_distributions() if packages is None else packages

                def distribution(strategy: Any, _p=packages) -> str | None:
                    return _distribution_of(strategy, _p)
            try:
                staged = self._collect_one(plugin, [p for _, p in plugins if p is not plugin],
                                           entries, distribution)
            except Exception as exc:
                if name not in self._isolated:
                    raise
                dist = self._isolated[name]
                message = (f"musco plugin {name!r} from distribution {dist!r} failed to register "
                           f"its strategies: {type(exc).__name__}: {exc}")
                self.pm.unregister(plugin=plugin)
                self._mark_broken(name, dist, message, exc, defer=defer)
                continue
            for kind, table in staged.items():
                entries[kind].update(table)
        return entries

    def _collect_one(self, plugin: Any, others: list[Any], entries: dict[str, dict[str, Entry]],
                     distribution: Any) -> dict[str, dict[str, Entry]]:
        staged: dict[str, dict[str, Entry]] = {}
        for kind, (hook_name, base, label) in KINDS.items():
            table: dict[str, Entry] = {}
            existing = entries[kind]

            def register(strategy: Any, aliases: Iterable[str] = (), *, override: bool = False,
                         _t=table, _b=base, _l=label, _e=existing):
                if not isinstance(strategy, _b):
                    raise PluginError(
                        f"a {_l} must be an instance of musco_core.{_b.__name__}, "
                        f"got {strategy!r}"
                    )
                if not strategy.name:
                    raise PluginError(f"{type(strategy).__name__} has no name")
                params = getattr(strategy, "Params", None)
                if attrs.has(params) and "name" in attrs.fields_dict(params):
                    raise PluginError(
                        f"{type(strategy).__name__}.Params has a field called 'name'; in a "
                        "spec's table 'name' names the strategy, so rename the field"
                    )
                _t.update(_entry(strategy, tuple(aliases), distribution(strategy), override,
                                 label=_l, staged=_t, existing=_e))

            self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
            staged[kind] = table
        return staged

    def get(self, kind: str, name: str) -> Entry:
        """The entry of ``kind`` called ``name``; a ``KeyError`` names the valid choices."""
        table = self.entries[kind]
        if name not in table:
            raise KeyError(f"unknown {KINDS[kind][2]} {name!r}; {did_you_mean(name, table)}")
        return table[name]

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind`` (aliases excluded), sorted."""
        return sorted({e.name for e in self.entries[kind].values()})

    def flop_formulas(self, model_total: bool = False) -> tuple[tuple[Any, Any], ...]:
        """The registered FLOP formulas as ``(module types, formula)`` pairs for the counter.

        With ``model_total`` only those whose ``in_model_total`` is true.
        """
        return tuple((e.strategy.module_types, e.strategy.flops)
                     for n, e in sorted(self.entries["flop_formulas"].items())
                     if n == e.name and (e.strategy.in_model_total or not model_total))

    def available(self) -> dict[str, list[dict[str, Any]]]:
        """Every strategy by kind, with its summary, aliases and owning distribution.

        Broken plugins (see :attr:`broken`) are not in it; ``musco plugins`` lists them.
        """
        def row(entry: Entry) -> dict[str, Any]:
            replaced = entry.replaces  # the strategy this one replaced with override=True
            return {"name": entry.name, "summary": entry.strategy.summary,
                    "aliases": list(entry.aliases), "distribution": entry.distribution,
                    "overrides": replaced and {"name": replaced.name,
                                               "distribution": replaced.distribution}}

        return {kind: [row(self.entries[kind][n]) for n in self.names(kind)] for kind in KINDS}


def _entry(strategy: Any, aliases: tuple[str, ...], dist: str | None, override: bool, *,
           label: str, staged: dict[str, Entry], existing: dict[str, Entry]) -> dict[str, Entry]:
    """The ``{key: Entry}`` a ``register(strategy, aliases, override=...)`` call adds.

    A name or alias the same plugin registered already, or one an earlier plugin
    registered (unless ``override``), is a :class:`PluginError` naming both sides.
    An override takes over every name and alias of the one strategy it replaces.
    """
    keys = (strategy.name, *aliases)
    new = _origin(strategy, dist)
    for key in keys:
        if key in staged or keys.count(key) > 1:
            raise PluginError(f"{label} name {key!r} registered twice by the same plugin "
                              f"({new})")
    taken = {id(e): e for key in keys if (e := existing.get(key)) is not None}
    if not taken:
        return dict.fromkeys(keys, Entry(strategy.name, strategy, dist, aliases))
    first = next(iter(taken.values()))
    old = _origin(first.strategy, first.distribution)
    key = next(k for k in keys if k in existing)
    if not override:
        raise PluginError(
            f"{label} name {key!r} registered twice: {new} registers it, but {old} registered "
            "it first. Choose another name, or pass override=True to register() to replace "
            f"{type(first.strategy).__name__} on purpose")
    if len(taken) > 1:
        raise PluginError(
            f"{label} {new} overrides with override=True, but its names "
            f"{', '.join(map(repr, keys))} belong to several strategies "
            f"({', '.join(_origin(e.strategy, e.distribution) for e in taken.values())}); "
            "an override replaces one")
    if first.replaces is not None:
        original = _origin(first.replaces.strategy, first.replaces.distribution)
        raise PluginError(
            f"{label} name {key!r}: {new} and {old} both override it (override=True); only "
            f"one plugin may replace {original}; block one of them with MUSCO_BLOCK_PLUGINS")
    # The replacement answers to every name of the strategy it replaces.
    inherited = tuple(k for k, e in existing.items() if e is first and k not in keys)
    entry = Entry(strategy.name, strategy, dist, aliases + inherited, replaces=first)
    return dict.fromkeys(keys + inherited, entry)


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, created (and the entry points loaded) on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def reset_default_registry() -> None:
    """Forget the process-wide registry, so the next use reloads the entry points."""
    global _default
    _default = None


def available() -> dict[str, list[dict[str, Any]]]:
    """``{kind: [...]}`` of the default registry, for every kind in :data:`KINDS`."""
    return default_registry().available()
