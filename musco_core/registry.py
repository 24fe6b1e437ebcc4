"""The strategy registry: a pluggy plugin manager filled from the ``musco`` entry points.

Environment switches (read when a registry is created):

``MUSCO_DISABLE_PLUGIN_AUTOLOAD=1``
    load entry points of the ``musco`` distribution itself (the first-party
    strategies) but no third-party ones.
``MUSCO_BLOCK_PLUGINS=a,b``
    do not load the entry points (plugins) named ``a`` and ``b``.
``MUSCO_TRACE_PLUGINS=1``
    write every hook call to stderr.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import attrs
import pluggy

from musco_core import hookspecs
from musco_core.errors import PluginError
from musco_core.strategies import Decomposition, Matcher, RankSelector, Strategy

ENTRY_POINT_GROUP = "musco"
FIRST_PARTY_DISTRIBUTION = "musco"

#: kind -> (hook name, base class, human-readable name)
KINDS: dict[str, tuple[str, type[Strategy], str]] = {
    "decompositions": ("musco_add_decompositions", Decomposition, "decomposition"),
    "rank_rules": ("musco_add_rank_rules", RankSelector, "rank rule"),
    "matchers": ("musco_add_matchers", Matcher, "matcher"),
}


@attrs.frozen
class Entry:
    """A registered strategy and where it came from."""

    name: str
    strategy: Strategy
    distribution: str | None
    aliases: tuple[str, ...] = ()


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
        if _env_flag("MUSCO_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        blocked = os.environ.get("MUSCO_BLOCK_PLUGINS", "")
        for name in filter(None, (n.strip() for n in blocked.split(","))):
            self.pm.set_blocked(name)
        if autoload:
            self._load_entry_points(first_party_only=_env_flag("MUSCO_DISABLE_PLUGIN_AUTOLOAD"))

    def _load_entry_points(self, *, first_party_only: bool) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            if first_party_only and dist != FIRST_PARTY_DISTRIBUTION:
                continue
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"could not load musco plugin {ep.name!r} ({ep.value}) from "
                    f"distribution {dist!r}: {exc}; block it with MUSCO_BLOCK_PLUGINS={ep.name}"
                ) from exc
            self.register_plugin(plugin, name=ep.name)

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
        entries: dict[str, dict[str, Entry]] = {}
        packages = metadata.packages_distributions()
        for kind, (hook_name, base, label) in KINDS.items():
            table: dict[str, Entry] = {}

            def register(strategy: Any, aliases: Iterable[str] = (), *, _t=table, _b=base, _l=label):
                if not isinstance(strategy, _b):
                    raise PluginError(
                        f"a {_l} must be an instance of musco_core.{_b.__name__}, "
                        f"got {strategy!r}"
                    )
                if not strategy.name:
                    raise PluginError(f"{type(strategy).__name__} has no name")
                entry = Entry(
                    name=strategy.name,
                    strategy=strategy,
                    distribution=_distribution_of(strategy, packages),
                    aliases=tuple(aliases),
                )
                for key in (entry.name, *entry.aliases):
                    if key in _t:
                        other = _t[key]
                        raise PluginError(
                            f"{_l} name {key!r} registered twice: by {type(strategy).__name__} "
                            f"and by {type(other.strategy).__name__} "
                            f"(distribution {other.distribution!r})"
                        )
                    _t[key] = entry

            getattr(self.pm.hook, hook_name)(register=register)
            entries[kind] = table
        return entries

    def get(self, kind: str, name: str) -> Entry:
        """The entry of ``kind`` called ``name``; a ``KeyError`` names the valid choices."""
        table = self.entries[kind]
        if name not in table:
            raise KeyError(f"unknown {KINDS[kind][2]} {name!r}; {did_you_mean(name, table)}")
        return table[name]

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind`` (aliases excluded), sorted."""
        return sorted({e.name for e in self.entries[kind].values()})

    def available(self) -> dict[str, list[dict[str, Any]]]:
        """Every strategy by kind, with its summary, aliases and owning distribution."""
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
    """``{"decompositions": [...], "rank_rules": [...], "matchers": [...]}`` of the default registry."""
    return default_registry().available()
