"""Reports of what a step did to each layer, as objects, dicts and text tables."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class LayerReport:
    """What happened to one layer in one step.

    ``status`` is ``"compressed"``, ``"skipped"`` (then ``reason`` says why),
    ``"planned"`` (a preview: ranks and counts, nothing decomposed) or ``"later"``
    (a preview of a layer of a later round, whose rank is chosen when it starts).
    ``flops`` are for the example inputs, counted by PyTorch. ``rel_error`` is
    ``|W - W'|_F / |W|_F`` of the layer's weight. With calibration data,
    ``output_error`` is the relative error of the layer's output on it,
    ``|Y - Y'|_F / |Y|_F`` with ``Y`` the original layer's output on the original
    model's inputs and ``Y'`` the new layer's on the inputs it sees now;
    ``refined_from`` is that error before local refinement. ``time_before`` /
    ``time_after`` are measured latencies in seconds (rules with ``min_speedup``).
    ``warning`` flags a rank far below full rank or a very large error.
    """

    name: str
    round: int
    decomposition: str
    rank_rule: str
    status: str
    rank: Any = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    rel_error: float | None = None
    seconds: float = 0.0
    reason: str = ""
    output_error: float | None = None
    refined_from: float | None = None
    time_before: float | None = None
    time_after: float | None = None
    warning: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        if isinstance(self.rank, tuple):
            data["rank"] = list(self.rank)
        return data


def format_table(layers: list[LayerReport] | tuple[LayerReport, ...]) -> str:
    """A fixed-width text table of layer reports, then their warnings (see
    :func:`musco_core.report_text.format_table`)."""
    from musco_core.report_text import format_table as table

    return table(layers)


@attrs.frozen
class StepReport:
    """The layers of one :meth:`Compressor.step`, with totals over the compressed ones."""

    step: int
    layers: tuple[LayerReport, ...]
    seconds: float = 0.0
    #: The whole model before and after the step (parameters deduplicated, FLOPs for
    #: the example inputs), not only the compressed layers.
    model_params_before: int = 0
    model_params_after: int = 0
    model_flops_before: int = 0
    model_flops_after: int = 0
    #: Relative error of the model's output against the original's on the calibration
    #: data after the step, and before refinement (measured with ``Refine(scope="model")``).
    model_output_error: float | None = None
    model_refined_from: float | None = None
    #: Warnings of the round planned when this step started (the plan's ``warnings``, e.g.
    #: a layer a rule of the round matches but cannot compress); empty for other steps.
    warnings: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @property
    def compressed(self) -> tuple[LayerReport, ...]:
        return tuple(r for r in self.layers if r.status == "compressed")

    @property
    def skipped(self) -> tuple[LayerReport, ...]:
        return tuple(r for r in self.layers if r.status != "compressed")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": self.seconds,
                "layers": [r.to_dict() for r in self.layers],
                **{k: getattr(self, k) for k in _MODEL_KEYS},
                **{k: getattr(self, k) for k in _ERROR_KEYS if getattr(self, k) is not None},
                **({"warnings": list(self.warnings)} if self.warnings else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepReport:
        """The inverse of :meth:`to_dict` (ranks written as lists become tuples again)."""
        layers = []
        for layer in data["layers"]:
            layer = dict(layer)
            if isinstance(layer.get("rank"), list):
                layer["rank"] = tuple(layer["rank"])
            layers.append(LayerReport(**layer))
        return cls(step=data["step"], layers=tuple(layers), seconds=data["seconds"],
                   **{k: int(data.get(k, 0)) for k in _MODEL_KEYS},
                   **{k: float(data[k]) for k in _ERROR_KEYS if data.get(k) is not None},
                   warnings=tuple(str(w) for w in data.get("warnings", ())))

    def __str__(self) -> str:
        from musco_core.report_text import step_text

        return step_text(self)


_MODEL_KEYS = ("model_params_before", "model_params_after", "model_flops_before",
               "model_flops_after")
_ERROR_KEYS = ("model_output_error", "model_refined_from")


def layer_history(steps) -> dict[str, tuple[LayerReport, LayerReport]]:
    """``{name: (first report, latest report)}`` of every layer compressed in ``steps``."""
    out: dict[str, tuple[LayerReport, LayerReport]] = {}
    for step in steps:
        for r in step.compressed:
            out[r.name] = (out[r.name][0] if r.name in out else r, r)
    return out


@attrs.frozen
class RunReport:
    """The whole run so far: every step, and per layer its first and latest state.

    ``model_params_before`` / ``model_params_after`` count the whole model's
    parameters; the layer totals cover the compressed layers only.
    """

    steps: tuple[StepReport, ...]
    model_params_before: int
    model_params_after: int
    #: FLOPs of the whole model for the example inputs (0 when unknown).
    model_flops_before: int = 0
    model_flops_after: int = 0

    @property
    def layers(self) -> dict[str, tuple[LayerReport, LayerReport]]:
        """``{name: (first report, latest report)}`` of every layer compressed at least once."""
        return layer_history(self.steps)

    def totals(self) -> dict[str, int]:
        layers = self.layers.values()
        return {
            "params_before": sum(first.params_before for first, _ in layers),
            "params_after": sum(last.params_after for _, last in layers),
            "flops_before": sum(first.flops_before for first, _ in layers),
            "flops_after": sum(last.flops_after for _, last in layers),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "model_flops_before": self.model_flops_before,
                "model_flops_after": self.model_flops_after,
                "compressed_layers": self.totals(),
                "steps": [s.to_dict() for s in self.steps]}

    def __str__(self) -> str:
        from musco_core.report_text import run_text

        return run_text(self)

    def plot(self, path=None):
        """Draw the run and save it to ``path`` (needs matplotlib); see :func:`musco_core.plot.plot_run`."""
        from musco_core._figure import plot_run  # a leaf module, not the plot adapter

        return plot_run(self, path)
