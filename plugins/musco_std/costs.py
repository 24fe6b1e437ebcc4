"""First-party costs a budget counts: FLOPs and parameters (counted), latency (measured)."""

from __future__ import annotations

from typing import Any

from musco_core import Cost
from musco_core.stats import param_count
from musco_std.latency import latency_model


class Flops(Cost):
    name = "flops"
    summary = "FLOPs of a forward pass on the example inputs (the decomposition's flop_count)"

    def layer(self, layer, rank, context) -> float:
        if rank is None:
            return float(layer.stats.flops)
        return float(context.decomposition.flop_count(layer.module, rank, layer.stats))

    def model(self, context: Any) -> float:
        return float(context.run.model_flops)


class Params(Cost):
    name = "params"
    summary = "parameter count (the decomposition's param_count; shared parameters once)"

    def layer(self, layer, rank, context) -> float:
        if rank is None:
            return float(layer.stats.params)
        return float(context.decomposition.param_count(layer.module, rank))

    def model(self, context: Any) -> float:
        return float(param_count(context.run.model))


class Latency(Cost):
    name = "latency"
    summary = ("seconds per forward pass, measured by the run's LatencyModel on the layer's "
               "input shape (Compressor(latency=...), else one on the model's device)")

    def layer(self, layer, rank, context) -> float:
        module = context.skeleton(layer, rank)
        seconds = latency_model(context.run).time_module(module, layer.stats.input_shape)
        return float(seconds) * layer.stats.calls

    def model(self, context: Any) -> float:
        run = context.run
        return float(latency_model(run).time_model(run.model, run.example_inputs))


COSTS = (Flops(), Params(), Latency())
