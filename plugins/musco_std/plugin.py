"""Registers musco's first-party strategies; loaded through the ``musco`` entry point."""

from __future__ import annotations

from musco_core import hookimpl
from musco_std.budget import BUDGET
from musco_std.matchers import MATCHERS
from musco_std.rank_rules import RANK_RULES
from musco_std.conv1d import SVD1d, Tucker21d
from musco_std.cp import CP3, CP4
from musco_std.hf_conv1d import SVDHFConv1D
from musco_std.recurrent import SVDRecurrent
from musco_std.svd import SVD
from musco_std.tucker2 import Tucker2


@hookimpl
def musco_add_decompositions(register):
    for decomposition in (SVD(), Tucker2(), CP3(), CP4(),
                          SVD1d(), Tucker21d(), SVDHFConv1D(), SVDRecurrent()):
        register(decomposition)


@hookimpl
def musco_add_rank_rules(register):
    for rule in RANK_RULES:
        register(rule)
    register(BUDGET)


@hookimpl
def musco_add_matchers(register):
    for matcher in MATCHERS:
        register(matcher)
