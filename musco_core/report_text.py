"""Reports as text: the layer table and the step and run summaries (what ``print`` shows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from musco_core.plan import Plan
    from musco_core.report import LayerReport, RunReport, StepReport


def _fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _ratio(before: int, after: int) -> str:
    return f"{before / after:.2f}x" if after else "-"


_COLUMNS = ("layer", "round", "decomposition", "rank", "params", "FLOPs", "rel.err", "time")
#: Shown only when some row has an output error (calibration data was given).
_OUT_COLUMN = "out.err"


def format_table(layers: list[LayerReport] | tuple[LayerReport, ...]) -> str:
    """A fixed-width text table of layer reports, then their warnings.

    The ``out.err`` column (relative output error on the calibration data, with
    the error before refinement in brackets) appears when some layer has one.
    """
    with_output = any(r.output_error is not None for r in layers)
    columns = _COLUMNS[:7] + ((_OUT_COLUMN,) if with_output else ()) + _COLUMNS[7:]
    rows = []
    for r in layers:
        out = "-"
        if r.status in ("compressed", "planned"):
            params = f"{_fmt_count(r.params_before)} -> {_fmt_count(r.params_after)}"
            flops = f"{_fmt_count(r.flops_before)} -> {_fmt_count(r.flops_after)}"
            err = f"{r.rel_error:.4f}" if r.rel_error is not None else "-"
            if r.output_error is not None:
                out = f"{r.output_error:.4f}"
                if r.refined_from is not None:
                    out += f" ({r.refined_from:.4f})"
        else:
            label = "skipped" if r.status == "skipped" else r.status
            params, flops, err, out = f"{label}: {r.reason}", "", "", ""
        rank = "x".join(map(str, r.rank)) if isinstance(r.rank, tuple) else str(r.rank or "-")
        row = (r.name, str(r.round), r.decomposition, rank, params, flops, err)
        rows.append(row + ((out,) if with_output else ()) + (f"{r.seconds:.2f}s",))
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"warning: {r.warning}" for r in layers if r.warning]
    return "\n".join(lines)


def _model_line(params_before: int, params_after: int, flops_before: int, flops_after: int) -> str:
    return (f"whole model: params {_fmt_count(params_before)} -> {_fmt_count(params_after)} "
            f"({_ratio(params_before, params_after)}), FLOPs {_fmt_count(flops_before)} -> "
            f"{_fmt_count(flops_after)} ({_ratio(flops_before, flops_after)})")



def step_text(self: StepReport) -> str:
    """``str(step_report)``: the step's totals, the model's, and the layer table."""
    done = self.compressed
    before = sum(r.params_before for r in done)
    after = sum(r.params_after for r in done)
    fbefore = sum(r.flops_before for r in done)
    fafter = sum(r.flops_after for r in done)
    head = (f"step {self.step}: {len(done)} layer(s) compressed, {len(self.skipped)} skipped; "
            f"params {_fmt_count(before)} -> {_fmt_count(after)} ({_ratio(before, after)}), "
            f"FLOPs {_fmt_count(fbefore)} -> {_fmt_count(fafter)} ({_ratio(fbefore, fafter)}) "
            f"in {self.seconds:.2f}s")
    if self.model_params_before:
        head += "\n" + _model_line(self.model_params_before, self.model_params_after,
                                   self.model_flops_before, self.model_flops_after)
    if self.model_output_error is not None:
        head += f"\nmodel output error on the calibration data: {self.model_output_error:.4g}"
        if self.model_refined_from is not None:
            head += f" (before refinement: {self.model_refined_from:.4g})"
    return head + "\n" + format_table(self.layers)


def run_text(self: RunReport) -> str:
    """``str(run_report)``: the run's totals and every compressed layer's latest state."""
    t = self.totals()
    lines = [
        f"{len(self.steps)} step(s), {len(self.layers)} layer(s) compressed",
        _model_line(self.model_params_before, self.model_params_after,
                    self.model_flops_before, self.model_flops_after),
        f"compressed layers: params {_fmt_count(t['params_before'])} -> "
        f"{_fmt_count(t['params_after'])} ({_ratio(t['params_before'], t['params_after'])}), "
        f"FLOPs {_fmt_count(t['flops_before'])} -> {_fmt_count(t['flops_after'])} "
        f"({_ratio(t['flops_before'], t['flops_after'])})",
    ]
    latest = [last for _, last in self.layers.values()]
    return "\n".join(lines) + "\n" + format_table(latest)


def plan_text(self: Plan) -> str:
    """``str(plan)``: the steps, then every layer with what the plan does with it."""
    lines = [f"round {self.round}: {len(self.layers)} layer(s) to compress; "
             f"{len(self.steps)} step(s) in all"]
    for i, step in enumerate(self.steps):
        lines.append(f"  step {i}: " + ", ".join(f"{n} (round {r})" for r, n in step))
    for e in self.entries:
        if e.status == "compress":
            what = f"rule {e.rule}: {e.decomposition} / {e.rank_rule}"
        else:
            what = f"{e.status}" + (f" ({e.reason})" if e.reason else "")
        lines.append(f"  {e.name:<40} {e.type:<16} {what}")
    lines += [f"  warning: {w}" for w in self.warnings]
    return "\n".join(lines)
