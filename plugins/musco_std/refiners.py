"""First-party refiners: train a step's new factors toward a layer's or the model's output.

No labels: the targets are the reference model's outputs on the calibration data.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import torch
from torch import nn

from musco_core import Refiner
from musco_core._util import first_tensor
from musco_core.stats import eval_mode, run_model
from musco_core.surgery import standing_in


def _optional_positive_number(instance, attribute, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0):
        raise ValueError(f"{attribute.name!r} must be a number > 0 or None, got {value!r}")


def _non_negative_number(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{attribute.name!r} must be a number >= 0, got {value!r}")


@attrs.frozen
class RefineParams:
    #: Optimizer steps (one calibration batch each); 0 turns refinement off.
    steps: int = attrs.field(default=100, validator=[attrs.validators.instance_of(int),
                                                     attrs.validators.ge(0)])
    #: Wall-clock budget in seconds (``None``: only ``steps`` limits it).
    seconds: float | None = attrs.field(default=None, validator=_optional_positive_number)
    #: Adam learning rate.
    lr: float = attrs.field(default=1e-4, validator=_non_negative_number)
    #: Seed of the batch order, so a run is deterministic.
    seed: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))


class _Adam(Refiner):
    """Adam on the new modules' parameters, one calibration batch per step (cycling).

    Stops after ``steps`` steps or ``seconds``, whichever comes first. The global
    RNG is seeded with ``seed`` inside (and restored after). Only the parameters of
    the new modules are trained; no other parameter's ``.grad`` is touched.
    """

    Params = RefineParams

    def enabled(self, params: Any) -> bool:
        return params.steps > 0

    def loss(self, modules: dict[str, nn.Module], context: Any):
        """``batch -> loss tensor`` for these modules."""
        raise NotImplementedError

    def refine(self, modules, context, params) -> None:
        trained = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        if not trained or params.steps == 0:
            return
        from musco_core.context import all_eval  # data-aware: loaded only when refining

        loss_of = self.loss(modules, context)
        optimizer = torch.optim.Adam(trained, lr=params.lr)
        deadline = time.perf_counter() + params.seconds if params.seconds else None
        bar = context.progress(range(params.steps), desc=f"musco refine ({self.name})")
        steps = iter(bar)
        done = 0
        with torch.random.fork_rng(devices=[]), all_eval(modules):
            torch.manual_seed(params.seed)
            while done < params.steps:
                progressed = False
                for batch in context.calibration:
                    if done >= params.steps or (deadline and time.perf_counter() > deadline):
                        break
                    with torch.enable_grad():
                        loss = loss_of(batch)
                        grads = torch.autograd.grad(loss, trained, allow_unused=True)
                    for p, g in zip(trained, grads):
                        p.grad = g
                    optimizer.step()
                    done += 1
                    progressed = True
                    next(steps, None)
                if not progressed or (deadline and time.perf_counter() > deadline):
                    break
        for p in trained:
            p.grad = None
        if hasattr(bar, "close"):
            bar.close()


class LayerOutput(_Adam):
    name = "layer_output"
    summary = ("train each new layer to reproduce its reference layer's output from the inputs "
               "it sees now (sum of relative squared errors)")

    def objective(self, modules, context, params) -> float:
        return sum(context.output_errors(modules).values())

    def loss(self, modules, context):
        from musco_core.calibration import paired_pass

        def loss_of(batch):
            pairs = []

            def on_pair(name, _index, args, _out, _args_o, out_o):
                pairs.append((name, tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                          for a in args), first_tensor(out_o).detach()))

            targets = {name: context.model.get_submodule(name) for name in modules}
            paired_pass(context.reference, context.model, [batch], targets, on_pair)
            return sum(_relative_mse(modules[name], args, y_o) for name, args, y_o in pairs)
        return loss_of


class ModelOutput(_Adam):
    name = "model_output"
    summary = ("train the step's new layers together, standing in for the old ones, to "
               "reproduce the reference model's output")
    step_field = "model_output_error"
    refined_field = "model_refined_from"

    def objective(self, modules, context, params) -> float:
        return context.model_output_error(modules)

    def loss(self, modules, context):
        reference, current = context.reference, context.model

        def loss_of(batch):
            with torch.no_grad(), eval_mode(reference):
                y_o = first_tensor(run_model(reference, batch)).detach()
            with eval_mode(current), standing_in(current, modules):
                y = first_tensor(run_model(current, batch))
            scale = torch.sum(y_o.float() ** 2).clamp_min(1e-30)
            return torch.sum((y.float() - y_o.float()) ** 2) / scale
        return loss_of


def _relative_mse(module: nn.Module, args: tuple, target: torch.Tensor) -> torch.Tensor:
    y = first_tensor(module(*args))
    scale = torch.sum(target.float() ** 2).clamp_min(1e-30)
    return torch.sum((y.float() - target.float()) ** 2) / scale


REFINERS = (LayerOutput(), ModelOutput())
