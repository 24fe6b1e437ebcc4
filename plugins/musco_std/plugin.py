"""Registers musco's first-party strategies; loaded through the ``musco`` entry point."""

from __future__ import annotations

from musco_core import hookimpl
from musco_std.matchers import MATCHERS
from musco_std.rank_rules import RANK_RULES
from musco_std.svd import SVD


@hookimpl
def musco_add_decompositions(register):
    register(SVD())


@hookimpl
def musco_add_rank_rules(register):
    for rule in RANK_RULES:
        register(rule)


@hookimpl
def musco_add_matchers(register):
    for matcher in MATCHERS:
        register(matcher)
