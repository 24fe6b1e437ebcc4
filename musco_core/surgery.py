"""Module surgery: the one place where layers of a model are replaced."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule ``name`` of ``model``; return the old module.

    Mutates ``model``. ``new`` is moved to the old module's device (and, for
    floating-point parameters, dtype), takes its train/eval mode, and receives
    its forward hooks and forward pre-hooks.
    """
    parent, child = _split(model, name)
    old = getattr(parent, child)
    ref = next(old.parameters(), None)
    if ref is not None:
        if ref.is_floating_point():
            new.to(device=ref.device, dtype=ref.dtype)
        else:
            new.to(device=ref.device)
    new.train(old.training)
    new._forward_hooks.update(old._forward_hooks)
    new._forward_pre_hooks.update(old._forward_pre_hooks)
    setattr(parent, child, new)
    return old


def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Replace several submodules at once, all or none; return the old modules by name.

    Mutates ``model``. If one replacement fails, those already made are undone
    before the error propagates.
    """
    done: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            done[name] = replace_module(model, name, new)
    except BaseException:
        for name, old in reversed(list(done.items())):
            parent, child = _split(model, name)
            setattr(parent, child, old)
        raise
    return done
