"""Module surgery: the one place where layers of a model are replaced."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn

from musco_core.errors import MuscoWarning


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name), child


def aliases(model: nn.Module, name: str) -> list[str]:
    """Every dotted name under which the submodule ``name`` is reachable (``name`` first).

    A module assigned twice (``self.alias = self.fc``) has two names; replacing it
    under one only would leave the old layer on the other path.
    """
    target = model.get_submodule(name)
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is target and n]
    return [name] + [n for n in names if n != name]


#: Hook dictionaries of nn.Module carried to a replacement, with their flag dictionaries
#: (``with_kwargs``, ``always_call``), so hooks keep the signature they were registered with.
#: Forward hooks see the layer's inputs and output, and full backward (pre-)hooks the
#: gradients of those, which the replacement shares: they mean the same on it.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_pre_hooks")

#: Hook dictionaries *not* carried over, by kind: state-dict hooks work on the old layer's
#: parameter names (``prefix + "weight"``), which the replacement does not have, so carrying
#: one that renames or migrates keys would corrupt saves and loads of the compressed model.
#: Each dropped hook is named in a MuscoWarning.
_DROPPED_HOOKS = {
    "_state_dict_pre_hooks": "state_dict pre-hook",
    "_state_dict_hooks": "state_dict hook",
    "_load_state_dict_pre_hooks": "load_state_dict pre-hook",
    "_load_state_dict_post_hooks": "load_state_dict post-hook",
}


def _hook_name(hook: Any) -> str:
    """A readable name of a hook (torch wraps some in ``_WrappedHook``; partials too)."""
    hook = getattr(hook, "hook", hook)
    hook = getattr(hook, "func", hook)
    return getattr(hook, "__qualname__", None) or repr(hook)


def _carry_hooks(old: nn.Module, new: nn.Module, name: str | None) -> None:
    """Copy the hooks that mean the same on ``new``; warn naming each one that does not."""
    for attr in _HOOK_DICTS:
        source = getattr(old, attr, None)
        if source:
            getattr(new, attr).update(source)
    dropped: list[str] = []
    layout: list[str] = []
    backward = getattr(old, "_backward_hooks", None)
    if backward:
        names = ", ".join(repr(_hook_name(h)) for h in backward.values())
        if old._is_full_backward_hook and new._is_full_backward_hook is not False:
            new._backward_hooks.update(backward)
            new._is_full_backward_hook = True
        elif old._is_full_backward_hook:
            dropped.append(f"full backward hook {names} (the replacement has non-full backward "
                           "hooks, which cannot be mixed with full ones)")
        else:
            dropped.append(f"backward hook {names} (a non-full hook from the deprecated "
                           "register_backward_hook sees the gradients of the layer's last "
                           "operation, which the replacement does not have; register it with "
                           "register_full_backward_hook)")
    for attr, kind in _DROPPED_HOOKS.items():
        for hook in (getattr(old, attr, None) or {}).values():
            layout.append(f"{kind} {_hook_name(hook)!r}")
    if layout:
        keys = ", ".join(n for n, _ in old.named_parameters()) or "none"
        dropped.append(f"{', '.join(layout)} (state-dict hooks work on the replaced layer's "
                       f"parameter names ({keys}), which the replacement does not have; "
                       "register them again on the new module if they still apply)")
    if dropped:
        where = f"layer {name!r}: " if name else ""
        warnings.warn(f"{where}the {type(new).__name__} replacing {type(old).__name__} does "
                      f"not keep these hooks: {'; '.join(dropped)}", MuscoWarning, stacklevel=4)


def carry_over(old: nn.Module, new: nn.Module, name: str | None = None) -> None:
    """Give ``new`` what belongs to the layer rather than to its weights; mutates ``new``.

    Device and floating-point dtype of ``old``'s parameters, train/eval mode,
    forward hooks and pre-hooks with their flags, full backward hooks and pre-hooks
    (they see the layer's input and output gradients, which ``new`` shares), and
    ``requires_grad``: if the old weight was frozen, so are the new factors; a bias
    keeps its own flag. Hooks that would not mean the same on ``new`` (state-dict
    hooks, written for ``old``'s parameter names, and deprecated non-full backward
    hooks) are not carried over: a :class:`~musco_core.errors.MuscoWarning` names
    each, and the layer ``name`` when given.
    """
    ref = next(old.parameters(), None)
    if ref is not None:
        if ref.is_floating_point():
            new.to(device=ref.device, dtype=ref.dtype)
        else:
            new.to(device=ref.device)
    new.train(old.training)
    _carry_hooks(old, new, name)
    old_params = dict(old.named_parameters())
    weight_grad = all(p.requires_grad for n, p in old_params.items() if not n.endswith("bias"))
    bias_grad = {p.requires_grad for n, p in old_params.items() if n.endswith("bias")}
    for pname, param in new.named_parameters():
        if pname.endswith("bias") and bias_grad:
            param.requires_grad_(all(bias_grad))
        else:
            param.requires_grad_(weight_grad)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule ``name`` of ``model``; return the old module.

    Mutates ``model`` and ``new`` (see :func:`carry_over`). Every alias of the old
    module (other names it is reachable under) gets ``new`` as well.
    """
    targets = aliases(model, name)
    old = model.get_submodule(name)
    carry_over(old, new, name)
    for target in targets:
        parent, child = _split(model, target)
        setattr(parent, child, new)
    return old


def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Replace several submodules at once, all or none; return the old modules by name.

    Mutates ``model``. If one replacement fails, those already made are undone
    (every alias included) before the error propagates.
    """
    done: dict[str, tuple[nn.Module, list[str]]] = {}
    try:
        for name, new in replacements.items():
            names = aliases(model, name)
            done[name] = (replace_module(model, name, new), names)
    except BaseException:
        for old, names in reversed(list(done.values())):
            for target in names:
                parent, child = _split(model, target)
                setattr(parent, child, old)
        raise
    return {name: old for name, (old, _) in done.items()}


@contextmanager
def standing_in(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    """Within the block, ``replacements[name]`` answers every call of ``model``'s layer ``name``.

    Nothing is swapped: a forward hook on the old layer returns the new module's output
    for the same positional and keyword arguments (the old layer still runs, its output
    is dropped). The hooks are removed when the block ends, also on error.
    """
    handles = []
    try:
        for name, new in replacements.items():
            def hook(_module, args, kwargs, _output, new=new):
                return new(*args, **kwargs)
            handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
