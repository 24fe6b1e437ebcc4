"""Output errors on calibration data, and local refinement of new factors without labels."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from musco_core.calibration import paired_pass
from musco_core.spec import Refine
from musco_core.stats import _first_tensor, eval_mode, run_model
from musco_core.surgery import standing_in


def output_errors(original: nn.Module, current: nn.Module, data: Iterable[Any],
                  modules: Mapping[str, nn.Module]) -> dict[str, float]:
    """Relative output error of each new module against the original layer, on ``data``.

    For layer ``name``, ``modules[name]`` (not yet in the model) is run on the
    inputs the layer of that name gets in ``current``; its output is compared with
    the original layer's output on the original model's inputs:
    ``sqrt(sum |Y - Y'|^2 / sum |Y|^2)`` over all batches. Nothing is changed.
    """
    sums = {name: [0.0, 0.0] for name in modules}

    def on_pair(name, _index, args, _out, _args_o, out_o):
        y = _first_tensor(modules[name](*args))
        y_o = _first_tensor(out_o)
        acc = sums[name]
        acc[0] += float(torch.sum((y.double() - y_o.double()) ** 2))
        acc[1] += float(torch.sum(y_o.double() ** 2))

    targets = {name: current.get_submodule(name) for name in modules}
    with _all_eval(modules):
        paired_pass(original, current, data, targets, on_pair)
    return {name: (d / r) ** 0.5 if r > 0 else d ** 0.5 for name, (d, r) in sums.items()}


def refine(original: nn.Module, current: nn.Module, data: Iterable[Any],
           modules: Mapping[str, nn.Module], options: Refine, *,
           progress: bool = False) -> dict[str, float]:
    """Train the new modules to reproduce the original's outputs; mutates ``modules``.

    Each optimizer step takes the next calibration batch (cycling) and runs the
    original model and ``current`` (where the old layers still are) on it. With
    ``options.scope == "layer"`` it minimises ``sum_layers |Y - new(X')|^2 / |Y|^2``,
    ``Y`` the original layer's output on the original inputs and ``X'`` what the
    layer gets in ``current``. With ``"model"`` the new modules stand in for the old
    ones in ``current`` (through forward hooks, removed after) and it minimises
    ``|f(x) - f'(x)|^2 / |f(x)|^2``, ``f`` the original model and ``f'`` the current
    one with the new modules, on the first tensor of the models' outputs. Only the
    parameters of ``modules`` are trained (Adam at ``options.lr``); no other
    parameter's ``.grad`` is touched. Stops after ``options.steps`` steps or
    ``options.seconds``, whichever comes first. The global RNG is seeded with
    ``options.seed`` inside (and restored after), so a run is deterministic for a
    seed. Returns ``{"steps": n, "loss": last loss}``.
    """
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if not params or options.steps == 0:
        return {"steps": 0, "loss": float("nan")}
    if options.scope == "model":
        loss_of = _model_loss(original, current, modules)
    else:
        def loss_of(batch):
            pairs = _capture(original, current, batch, modules)
            return sum(_relative_mse(modules[name], args, y_o) for name, args, y_o in pairs)

    optimizer = torch.optim.Adam(params, lr=options.lr)
    deadline = time.perf_counter() + options.seconds if options.seconds else None
    bar = _bar(options.steps, progress)
    done, loss_value = 0, float("nan")
    with torch.random.fork_rng(devices=[]), _all_eval(modules):
        torch.manual_seed(options.seed)
        while done < options.steps:
            progressed = False
            for batch in data:
                if done >= options.steps or (deadline and time.perf_counter() > deadline):
                    break
                with torch.enable_grad():
                    loss = loss_of(batch)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
                loss_value = float(loss.detach())
                done += 1
                progressed = True
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4g}")
            if not progressed or (deadline and time.perf_counter() > deadline):
                break
    for p in params:
        p.grad = None
    if bar is not None:
        bar.close()
    return {"steps": done, "loss": loss_value}


def model_output_error(original: nn.Module, current: nn.Module, data: Iterable[Any],
                       modules: Mapping[str, nn.Module]) -> float:
    """Relative error of ``current``'s output, with ``modules`` standing in, against ``original``.

    ``sqrt(sum |f(x) - f'(x)|^2 / sum |f(x)|^2)`` over the batches of ``data``, on
    the first tensor of the outputs; both models in eval mode, nothing changed.
    """
    diff = total = 0.0
    with torch.no_grad(), eval_mode(original), eval_mode(current), _all_eval(modules), \
            standing_in(current, modules):
        for batch in data:
            y_o = _first_tensor(run_model(original, batch)).double()
            y = _first_tensor(run_model(current, batch)).double()
            diff += float(torch.sum((y - y_o) ** 2))
            total += float(torch.sum(y_o ** 2))
    return (diff / total) ** 0.5 if total > 0 else diff ** 0.5


def _model_loss(original, current, modules):
    def loss_of(batch):
        with torch.no_grad(), eval_mode(original):
            y_o = _first_tensor(run_model(original, batch)).detach()
        with eval_mode(current), standing_in(current, modules):
            y = _first_tensor(run_model(current, batch))
        scale = torch.sum(y_o.float() ** 2).clamp_min(1e-30)
        return torch.sum((y.float() - y_o.float()) ** 2) / scale
    return loss_of


def _capture(original, current, batch, modules) -> list[tuple[str, tuple, torch.Tensor]]:
    """(name, inputs now, original output) of every call of the layers in ``modules``."""
    pairs: list[tuple[str, tuple, torch.Tensor]] = []

    def on_pair(name, _index, args, _out, _args_o, out_o):
        pairs.append((name, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                      _first_tensor(out_o).detach()))

    targets = {name: current.get_submodule(name) for name in modules}
    paired_pass(original, current, [batch], targets, on_pair)
    return pairs


def _relative_mse(module: nn.Module, args: tuple, target: torch.Tensor) -> torch.Tensor:
    y = _first_tensor(module(*args))
    scale = torch.sum(target.float() ** 2).clamp_min(1e-30)
    return torch.sum((y.float() - target.float()) ** 2) / scale


class _all_eval:
    """Context: every module of a mapping in eval mode, modes restored after."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.contexts = [eval_mode(m) for m in modules.values()]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="musco refine", unit="step", leave=False)

