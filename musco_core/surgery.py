"""Module surgery: the one place where layers of a model are replaced."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn


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
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def carry_over(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` what belongs to the layer rather than to its weights; mutates ``new``.

    Device and floating-point dtype of ``old``'s parameters, train/eval mode,
    forward hooks and pre-hooks with their flags, and ``requires_grad``: if the
    old weight was frozen, so are the new factors; a bias keeps its own flag.
    """
    ref = next(old.parameters(), None)
    if ref is not None:
        if ref.is_floating_point():
            new.to(device=ref.device, dtype=ref.dtype)
        else:
            new.to(device=ref.device)
    new.train(old.training)
    for attr in _HOOK_DICTS:
        source = getattr(old, attr, None)
        if source:
            getattr(new, attr).update(source)
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
    carry_over(old, new)
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
