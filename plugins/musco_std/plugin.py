"""Registers musco's first-party strategies; loaded through the ``musco`` entry point."""

from __future__ import annotations

from musco_core import hookimpl
from musco_std.budget import BUDGET
from musco_std.costs import COSTS
from musco_std.flop_formulas import FLOP_FORMULAS
from musco_std.gates import GATES
from musco_std.refiners import REFINERS
from musco_std.statistics import STATISTICS
from musco_std.matchers import MATCHERS
from musco_std.rank_rules import RANK_RULES
from musco_std.conv1d import SVD1d, Tucker21d
from musco_std.cp import CP3, CP4
from musco_std.hf_conv1d import SVDHFConv1D
from musco_std.recurrent import SVDRecurrent
from musco_std.routing import Routed
from musco_std.svd import SVD
from musco_std.tucker2 import Tucker2


@hookimpl
def musco_add_decompositions(register):
    # `svd` and `tucker2` also take the 1-D layer types (and GPT-2's Conv1D), handed to
    # the specialised decompositions, which stay registered under their own names too.
    for decomposition in (Routed(SVD(), SVD1d(), SVDHFConv1D()), Routed(Tucker2(), Tucker21d()),
                          CP3(), CP4(), SVD1d(), Tucker21d(), SVDHFConv1D(), SVDRecurrent()):
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


@hookimpl
def musco_add_statistics(register):
    for statistic in STATISTICS:
        register(statistic)


@hookimpl
def musco_add_refiners(register):
    for refiner in REFINERS:
        register(refiner)


@hookimpl
def musco_add_costs(register):
    for cost in COSTS:
        register(cost)


@hookimpl
def musco_add_gates(register):
    for gate in GATES:
        register(gate)


@hookimpl
def musco_add_flop_formulas(register):
    for formula in FLOP_FORMULAS:
        register(formula)
