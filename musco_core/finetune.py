"""Fine-tuning between steps: keep an optimizer (and its schedulers) on the model's live parameters.

A :meth:`Compressor.step` replaces layers, and with them their parameters. An optimizer
built before the step still holds the replaced ones: it keeps "training" tensors that no
longer take part in the forward pass, and never sees the new factors. Nothing fails; the
model simply stops learning where it was compressed. The helpers here fix that::

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    while not compressor.done:
        report, optimizer = musco.compress_step(compressor, optimizer, scheduler)
        fine_tune(compressor.model, optimizer)

or, by hand, ``names = parameter_names(model)`` before the step and
``optimizer = rebuild_optimizer(optimizer, model, names=names)`` after it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["compress_step", "parameter_names", "rebuild_optimizer", "retarget_schedulers",
           "stale_parameters"]


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``{id(parameter): dotted name}`` of ``model``'s parameters; take it before a step.

    :func:`rebuild_optimizer` uses it to know which layer a replaced parameter belonged
    to (the optimizer holds only the tensors), and which parameters existed before.
    """
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def stale_parameters(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[torch.Tensor]:
    """The parameters ``optimizer`` holds that are no longer part of ``model``.

    Non-empty after a :meth:`Compressor.step` unless the optimizer was rebuilt: those
    tensors are the replaced layers' weights, trained for nothing. A cheap check to put
    in a training loop: ``assert not stale_parameters(optimizer, model)``.
    """
    live = {id(p) for p in model.parameters()}
    return [p for group in optimizer.param_groups for p in group["params"] if id(p) not in live]


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, *,
                      names: Mapping[int, str] | None = None) -> torch.optim.Optimizer:
    """A new optimizer of the same class over ``model``'s current parameters.

    - Each param group keeps its hyperparameters (``lr``, ``weight_decay``, betas,
      ``initial_lr`` of a scheduler ...), and the optimizer its ``defaults``.
    - Parameters that are still in the model keep their group and their state
      (Adam's moments, SGD's momentum buffer).
    - Parameters no longer in the model are dropped, with their state.
    - New parameters (the factors of replaced layers: those that require a gradient,
      are in no group and, when ``names`` is given, did not exist when it was taken)
      go into the group that held the parameters they replace, matched by module
      name: ``layer.first.weight`` joins the group of the old ``layer.weight``, and
      ``layer.second.bias`` that of the old ``layer.bias``.
      When no replaced parameter's module is a prefix of the name, they go into the
      first group.
    - Within each group, parameters are in the model's order, so a fresh optimizer
      built the usual way (``model.parameters()``) lines up with this one's
      ``state_dict()``, as a resumed run needs.

    The names of replaced parameters come from the groups' ``param_names`` (an
    optimizer built from ``model.named_parameters()``) or from ``names``, the
    :func:`parameter_names` of the model taken before the step. Without either,
    every new parameter goes into the first group (with a warning when there are
    several groups). ``optimizer`` is not modified. Point schedulers at the result
    with :func:`retarget_schedulers`, or use :func:`compress_step`, which does all of it.
    """
    groups = optimizer.param_groups
    named = "param_names" in groups[0] if groups else False
    params_now = list(model.named_parameters())
    live = {id(p) for _, p in params_now}
    in_group: dict[int, int] = {}
    dead_modules: list[tuple[str, str, int]] = []  # (module of a replaced param, leaf, group)
    unnamed_dead = 0
    for g, group in enumerate(groups):
        group_names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if id(p) in live:
                in_group[id(p)] = g
                continue
            name = group_names[i] if group_names else (names or {}).get(id(p))
            if name is None:
                unnamed_dead += 1
            else:
                module, _, leaf = name.rpartition(".")
                dead_modules.append((module, leaf, g))

    existed = set(names) if names is not None else set()
    members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in groups]
    unplaced = []
    for name, p in params_now:
        if id(p) in in_group:
            members[in_group[id(p)]].append((name, p))
        elif p.requires_grad and id(p) not in existed:
            g = _group_by_prefix(name, dead_modules)
            if g is None:
                g = 0
                unplaced.append(name)
            members[g].append((name, p))
    if unplaced and unnamed_dead and len(groups) > 1:
        warnings.warn(
            f"rebuild_optimizer: {len(unplaced)} new parameter(s) ({', '.join(unplaced[:3])}"
            f"{', ...' if len(unplaced) > 3 else ''}) were put in param group 0: the optimizer "
            f"has {len(groups)} groups and the replaced parameters' names are unknown. Pass "
            "names=parameter_names(model) taken before the step, build the optimizer from "
            "model.named_parameters(), or use musco.compress_step()", stacklevel=2)

    new_groups = []
    for group, group_members in zip(groups, members):
        new_group = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        new_group["params"] = [p for _, p in group_members]
        if named:
            new_group["param_names"] = [n for n, _ in group_members]
        new_groups.append(new_group)

    new = _construct(optimizer, new_groups)
    for group in new.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                new.state[p] = optimizer.state[p]
    # Hooks registered on the optimizer belong to the user's training set-up; keep them.
    for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        if getattr(optimizer, attr, None):
            getattr(new, attr).update(getattr(optimizer, attr))
    return new


def _group_by_prefix(name: str, dead_modules: list[tuple[str, str, int]]) -> int | None:
    """The group of the replaced parameter whose module is the longest prefix of ``name``;
    among those, one with the same last name (a factor's ``bias`` joins the old ``bias``)."""
    leaf = name.rpartition(".")[2]
    best, best_key = None, (-1, False)
    for module, old_leaf, g in dead_modules:
        if module and not name.startswith(module + "."):
            continue
        key = (len(module), old_leaf == leaf)
        if key > best_key:
            best, best_key = g, key
    return best


def _construct(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]):
    """``type(optimizer)(groups, **defaults)`` with the defaults its constructor accepts."""
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    # torch refuses an empty group list; a group left empty (all its layers replaced
    # by nothing) keeps its place so that schedulers' per-group lists still line up.
    empty = [i for i, g in enumerate(groups) if not g["params"]]
    filled = [g for g in groups if g["params"]]
    if not filled:
        raise ValueError("rebuild_optimizer: the model has no parameter left for the optimizer")
    new = cls(filled, **kwargs)
    for i in empty:
        new.param_groups.insert(i, groups[i])
    new.defaults = dict(optimizer.defaults)
    return new


def retarget_schedulers(schedulers: Iterable[Any], optimizer: torch.optim.Optimizer) -> None:
    """Point learning-rate schedulers at ``optimizer`` (after :func:`rebuild_optimizer`).

    Their progress (``last_epoch``, ``base_lrs``) is kept; chained and sequential
    schedulers are retargeted with the schedulers they hold. Mutates the schedulers.
    """
    for scheduler in schedulers:
        if scheduler is None:
            continue
        old = getattr(scheduler, "optimizer", None)
        scheduler.optimizer = optimizer
        if getattr(old, "_opt_called", False):
            optimizer._opt_called = True
        retarget_schedulers(getattr(scheduler, "_schedulers", ()), optimizer)


def compress_step(compressor, optimizer: torch.optim.Optimizer, *schedulers):
    """``compressor.step()``, then the optimizer rebuilt and the schedulers pointed at it.

    Returns ``(report, new_optimizer)``; use the new optimizer from here on::

        report, optimizer = musco.compress_step(compressor, optimizer, scheduler)
    """
    names = parameter_names(compressor.model)
    report = compressor.step()
    new = rebuild_optimizer(optimizer, compressor.model, names=names)
    retarget_schedulers(schedulers, new)
    return report, new
