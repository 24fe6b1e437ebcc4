"""Surgery hardening: hooks of a replaced layer are carried over, or dropped with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core.errors import MuscoWarning
from musco_core.surgery import carry_over, replace_module


def _compress(model: nn.Module, rank: int = 4) -> musco.Compressor:
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=rank))])
    compressor = musco.Compressor(model, spec, torch.randn(2, 16))
    compressor.step()
    return compressor


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def test_a_full_backward_hook_on_a_replaced_linear_still_fires():
    model = _model()
    old = model[0]
    seen: list = []
    old.register_full_backward_pre_hook(
        lambda module, grad_output: seen.append(("pre", module, grad_output[0].shape)))
    old.register_full_backward_hook(
        lambda module, grad_input, grad_output: seen.append(
            ("hook", module, grad_input[0].shape, grad_output[0].shape)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MuscoWarning)
        compressor = _compress(model)
    new = compressor.model[0]
    assert new is not old
    seen.clear()
    x = torch.randn(3, 16, requires_grad=True)
    compressor.model(x).sum().backward()
    assert [s[0] for s in seen] == ["pre", "hook"]
    assert seen[0][1] is new and seen[0][2] == (3, 12)
    assert seen[1][2:] == ((3, 16), (3, 12))  # the layer's input and output gradients
    assert x.grad is not None
    assert all(p.grad is not None for p in new.parameters())  # gradients flow through it


def test_a_backward_hook_that_changes_the_gradient_keeps_doing_so():
    model = _model()
    model[0].register_full_backward_hook(lambda m, gi, go: (torch.zeros_like(gi[0]),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MuscoWarning)
        compressor = _compress(model)
    x = torch.randn(3, 16, requires_grad=True)
    compressor.model(x).sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_a_deprecated_non_full_backward_hook_is_dropped_with_a_warning():
    old = nn.Linear(16, 12)

    def old_style(module, grad_input, grad_output):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old.register_backward_hook(old_style)
    model = nn.Sequential(old)
    new = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 12))
    with pytest.warns(MuscoWarning, match=r"layer '0'.*old_style.*register_full_backward_hook"):
        replace_module(model, "0", new)
    assert not new._backward_hooks


def test_state_dict_hooks_of_a_replaced_layer_are_dropped_with_a_warning_naming_each():
    model = _model()
    old = model[0]

    def rename_weight(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "w"] = state_dict.pop(prefix + "weight")

    def before_save(module, prefix, keep_vars):
        pass

    def migrate_on_load(module, state_dict, prefix, *args):
        state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")

    def after_load(module, incompatible_keys):
        pass

    old.register_state_dict_post_hook(rename_weight)
    old.register_state_dict_pre_hook(before_save)
    old.register_load_state_dict_pre_hook(migrate_on_load)
    old.register_load_state_dict_post_hook(after_load)
    assert set(old.state_dict()) == {"w", "bias"}  # the hook works on the old layout
    with pytest.warns(MuscoWarning) as record:
        compressor = _compress(model)
    messages = [str(w.message) for w in record if "hook" in str(w.message)]
    for hook in (rename_weight, before_save, migrate_on_load, after_load):
        assert any(hook.__name__ in m and "layer '0'" in m for m in messages), (hook, messages)
    assert all("layer '2'" not in m for m in messages)
    new = compressor.model[0]
    for attr in ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks"):
        assert not getattr(new, attr), attr
    # saving and loading the compressed model work on its own layout
    state = compressor.model.state_dict()
    assert "0.w" not in state and "0.first.weight" in state
    compressor.model.load_state_dict(state)


def test_carry_over_without_a_name_still_warns_and_keeps_forward_hooks():
    old, new = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 4))
    calls = []
    old.register_forward_hook(lambda m, i, o: calls.append("forward"))
    old.register_state_dict_pre_hook(lambda m, prefix, keep_vars: None)
    with pytest.warns(MuscoWarning, match="state_dict pre-hook"):
        carry_over(old, new)
    new(torch.randn(1, 4))
    assert calls == ["forward"]


def test_a_layer_without_extra_hooks_gives_no_hook_warning():
    model = _model()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _compress(model)
    assert not [w for w in record if "hook" in str(w.message)]
