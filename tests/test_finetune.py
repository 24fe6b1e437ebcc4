"""rebuild_optimizer & co.: an optimizer follows the model through compression steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core.finetune import compress_step, parameter_names, rebuild_optimizer, stale_parameters

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:layer .* keeps")]  # rank 4 on purpose


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


SPEC = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                    rank=musco.RankRule("fixed", rank=4))],
                  exclude=["4"], layers_per_step=1)
X = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
Y = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))


def train(model, optimizer, steps=2):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(X), Y).backward()
        optimizer.step()


def two_groups(model):
    """Decay on weights, none on biases: the usual split."""
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1, "lr": 1e-2},
                              {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3}])


def test_stale_optimizer_is_detected_and_rebuilt():
    compressor = musco.Compressor(make_model(), SPEC, example_inputs=X, inplace=True)
    model = compressor.model
    optimizer = two_groups(model)
    train(model, optimizer)
    survivor = model[2].weight
    moments = optimizer.state[survivor]["exp_avg"].clone()
    names = parameter_names(model)
    old_weight = model[0].weight

    compressor.step()                                   # replaces layer "0"
    stale = stale_parameters(optimizer, model)
    assert any(p is old_weight for p in stale) and len(stale) == 2   # 0.weight, 0.bias

    new = rebuild_optimizer(optimizer, model, names=names)
    assert type(new) is torch.optim.AdamW
    assert not stale_parameters(new, model)
    assert [g["lr"] for g in new.param_groups] == [1e-2, 5e-3]
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]
    held = {id(p) for g in new.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    # the factors of layer "0" joined the group of the old 0.weight, its bias that of 0.bias
    factors = [p for n, p in model.named_parameters() if n.startswith("0.")]
    expected = [[n for n, _ in model.named_parameters() if not n.endswith("bias")],
                [n for n, _ in model.named_parameters() if n.endswith("bias")]]
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert [[by_id[id(p)] for p in g["params"]] for g in new.param_groups] == expected
    # surviving parameters keep their Adam state; new ones start fresh
    assert torch.equal(new.state[survivor]["exp_avg"], moments)
    assert all(p not in new.state for p in factors)
    assert optimizer.param_groups[0]["params"][0] is old_weight   # the old one is untouched

    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("0.")}
    train(model, new, steps=1)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()
               if n.startswith("0."))


def test_param_names_in_groups_need_no_snapshot():
    compressor = musco.Compressor(make_model(), SPEC, example_inputs=X, inplace=True)
    model = compressor.model
    optimizer = torch.optim.SGD([
        {"params": [(n, p) for n, p in model.named_parameters() if n.startswith("0.")], "lr": 0.5},
        {"params": [(n, p) for n, p in model.named_parameters() if not n.startswith("0.")],
         "lr": 0.1},
    ], momentum=0.9)
    train(model, optimizer)
    compressor.step()
    new = rebuild_optimizer(optimizer, model)
    assert new.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()
                                                  if n.startswith("0.")]
    assert new.param_groups[0]["lr"] == 0.5 and new.defaults["momentum"] == 0.9


def test_unknown_names_with_several_groups_warn_and_use_group_0():
    compressor = musco.Compressor(make_model(), SPEC, example_inputs=X, inplace=True)
    model = compressor.model
    optimizer = two_groups(model)
    compressor.step()
    with pytest.warns(UserWarning, match="param group 0"):
        new = rebuild_optimizer(optimizer, model)
    assert {id(p) for p in new.param_groups[0]["params"]} >= {
        id(p) for n, p in model.named_parameters() if n.startswith("0.")}


def test_compress_step_keeps_scheduler_and_resume_order():
    compressor = musco.Compressor(make_model(), SPEC, example_inputs=X, inplace=True)
    optimizer = torch.optim.Adam(compressor.model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(compressor.model, optimizer)
    scheduler.step()
    while not compressor.done:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, optimizer = compress_step(compressor, optimizer, scheduler)
        train(compressor.model, optimizer)
        scheduler.step()
    assert scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    # the rebuilt optimizer's state lines up with a fresh one over model.parameters()
    fresh = torch.optim.Adam(compressor.model.parameters(), lr=1.0)
    fresh.load_state_dict(optimizer.state_dict())
    for p in compressor.model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])


def test_frozen_layers_stay_out():
    compressor = musco.Compressor(make_model(), SPEC, example_inputs=X, inplace=True)
    model = compressor.model
    for p in model[0].parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _, new = compress_step(compressor, optimizer)        # "0" is frozen: its factors too
    assert not any(p is q for g in new.param_groups for p in g["params"]
                   for q in model[0].parameters())


def test_fine_tuning_page_runs_as_written():
    """The self-contained blocks of docs/fine-tuning.md (not the Lightning / torchrun ones)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "fine-tuning.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    runnable = [b for b in blocks if "lightning" not in b and "torchrun" not in b
                and "dist." not in b]
    assert len(runnable) == 3
    namespace: dict = {"__name__": "__docs__"}
    for code in runnable:
        exec(compile(code, "docs/fine-tuning.md", "exec"), namespace)
