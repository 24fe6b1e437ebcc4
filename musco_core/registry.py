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

A third-party plugin that fails to import, raises in a registration hook or
registers something invalid is *broken*: it is skipped (unregistered), a
:class:`PluginWarning` names it and its distribution, and :attr:`Registry.broken`
and ``musco plugins`` list it. Specs that use only working strategies keep
working. Plugins you register yourself with :meth:`Registry.register_plugin`, and
the first-party plugin, raise :class:`PluginError` instead.
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
    """A registered strategy and where it came from."""

    name: str
    strategy: Strategy
    distribution: str | None
    aliases: tuple[str, ...] = ()


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

    def _load_entry_points(self, *, first_party_only: bool, blocked: list[str]) -> None:
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        known = sorted({ep.name for ep in eps})
        for name in blocked:
            if name not in known:
                warnings.warn(
                    f"MUSCO_BLOCK_PLUGINS names {name!r}, which is not an installed musco "
                    f"plugin; {did_you_mean(name, known)}", PluginWarning, stacklevel=3)
        if not any(ep.dist is not None and ep.dist.name == FIRST_PARTY_DISTRIBUTION
                   for ep in eps):
            raise PluginError(INSTALL_HINT)
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else None
            if first_party_only and dist != FIRST_PARTY_DISTRIBUTION:
                continue
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                if dist == FIRST_PARTY_DISTRIBUTION:
                    self.register_plugin(plugin, name=ep.name)
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
            self._entries = None

    def _mark_broken(self, name: str, dist: str | None, message: str, exc: BaseException) -> None:
        """Skip a failed third-party plugin: warn, list it, or raise in strict mode."""
        if self.strict:
            raise PluginError(f"{message} (MUSCO_STRICT_PLUGINS is set; block it with "
                              f"MUSCO_BLOCK_PLUGINS={name})") from exc
        self.broken.append(BrokenPlugin(name=name, distribution=dist, error=message))
        warnings.warn(f"{message}; the plugin was skipped (block it with "
                      f"MUSCO_BLOCK_PLUGINS={name}, or set MUSCO_STRICT_PLUGINS=1 to make "
                      "this an error)", PluginWarning, stacklevel=4)

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
        """``{kind: {name_or_alias: Entry}}``, collected from the plugins on first use."""
        if self._entries is None:
            self._entries = self._collect()
        return self._entries

    def _collect(self) -> dict[str, dict[str, Entry]]:
        """Call every plugin's registration hooks, one plugin at a time, in load order.

        A plugin's strategies are added only when all its hooks succeed, so a
        broken plugin (see the module docs) leaves nothing half-registered.
        """
        entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        packages = metadata.packages_distributions()
        plugins = self.pm.list_name_plugin()
        for name, plugin in plugins:
            if plugin is None or not self.pm.is_registered(plugin):
                continue
            try:
                staged = self._collect_one(plugin, [p for _, p in plugins if p is not plugin],
                                           entries, packages)
            except Exception as exc:
                if name not in self._isolated:
                    raise
                dist = self._isolated[name]
                message = (f"musco plugin {name!r} from distribution {dist!r} failed to register "
                           f"its strategies: {type(exc).__name__}: {exc}")
                self.pm.unregister(plugin=plugin)
                self._mark_broken(name, dist, message, exc)
                continue
            for kind, table in staged.items():
                entries[kind].update(table)
        return entries

    def _collect_one(self, plugin: Any, others: list[Any], entries: dict[str, dict[str, Entry]],
                     packages: dict[str, list[str]]) -> dict[str, dict[str, Entry]]:
        staged: dict[str, dict[str, Entry]] = {}
        for kind, (hook_name, base, label) in KINDS.items():
            table: dict[str, Entry] = {}
            existing = entries[kind]

            def register(strategy: Any, aliases: Iterable[str] = (), *, _t=table, _b=base,
                         _l=label, _e=existing):
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
                entry = Entry(
                    name=strategy.name,
                    strategy=strategy,
                    distribution=_distribution_of(strategy, packages),
                    aliases=tuple(aliases),
                )
                for key in (entry.name, *entry.aliases):
                    other = _t.get(key) or _e.get(key)
                    if other is not None:
                        raise PluginError(
                            f"{_l} name {key!r} registered twice: by {type(strategy).__name__} "
                            f"and by {type(other.strategy).__name__} "
                            f"(distribution {other.distribution!r})"
                        )
                    _t[key] = entry

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
        out: dict[str, list[dict[str, Any]]] = {}
        for kind in KINDS:
            rows = []
            for name in self.names(kind):
                entry = self.entries[kind][name]
                rows.append(
                    {
                        "name": entry.name,
                        "summary": entry.strategy.summary,
                        "aliases": list(entry.aliases),
                        "distribution": entry.distribution,
                    }
                )
            out[kind] = rows
        return out


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
