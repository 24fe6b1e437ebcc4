"""Reports as text: the layer table and the step and run summaries (what ``print`` shows)."""

from __future__ import annotations

import textwrap
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
#: Notes (skip reasons, warnings) are wrapped to lines of at most this many characters.
WIDTH = 100


def _wrap(text: str, first: str, rest: str | None = None) -> list[str]:
    """``text`` after ``first``, wrapped at :data:`WIDTH`, continued after ``rest``.

    The lines are balanced (no last line of one word): the narrowest width that
    needs no more lines than :data:`WIDTH` does.
    """
    rest = " " * len(first) if rest is None else rest

    def wrap(width: int) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                             break_long_words=False, break_on_hyphens=False)

    lines = wrap(WIDTH)
    if len(lines) < 2:
        return lines or [first.rstrip()]
    for width in range(len(first + text) // len(lines), WIDTH):
        narrower = wrap(width)
        if len(narrower) == len(lines):
            return narrower
    return lines


def format_table(layers: list[LayerReport] | tuple[LayerReport, ...]) -> str:
    """A fixed-width text table of layer reports, then their notes and warnings.

    The ``out.err`` column (relative output error on the calibration data, with
    the error before refinement in brackets) appears when some layer has one. A
    skipped layer says ``skipped`` in the params column and why on a line of its
    own under its row; the layers of a later round (a preview's ``later`` rows) say
    ``later``, and what that means is said once under the table.
    """
    with_output = any(r.output_error is not None for r in layers)
    columns = _COLUMNS[:7] + ((_OUT_COLUMN,) if with_output else ()) + _COLUMNS[7:]
    rows, notes, footnotes = [], [], []
    for r in layers:
        out, note = "-", ""
        if r.status in ("compressed", "planned"):
            params = f"{_fmt_count(r.params_before)} -> {_fmt_count(r.params_after)}"
            flops = f"{_fmt_count(r.flops_before)} -> {_fmt_count(r.flops_after)}"
            err = f"{r.rel_error:.4f}" if r.rel_error is not None else "-"
            if r.output_error is not None:
                out = f"{r.output_error:.4f}"
                if r.refined_from is not None:
                    out += f" ({r.refined_from:.4f})"
        else:
            params, flops, err, out = r.status, "", "", ""
            if r.status == "skipped":
                note = r.reason
            elif r.reason and f"{r.status}: {r.reason}" not in footnotes:
                footnotes.append(f"{r.status}: {r.reason}")
        rank = "x".join(map(str, r.rank)) if isinstance(r.rank, tuple) else str(r.rank or "-")
        row = (r.name, str(r.round), r.decomposition, rank, params, flops, err)
        rows.append(row + ((out,) if with_output else ()) + (f"{r.seconds:.2f}s",))
        notes.append(note)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row, note in zip(rows, notes):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        if note:
            lines += _wrap(note, "  ")
    for footnote in footnotes:
        lines += _wrap(footnote, "", "  ")
    lines += [f"warning: {r.warning}" for r in layers if r.warning]  # one line each: grep them
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
    text = head + "\n" + format_table(self.layers)
    shown = {r.warning for r in self.layers}
    lines = [line for w in self.warnings if w not in shown
             for line in _wrap(w, "warning: ", "  ")]
    return text + "".join("\n" + line for line in lines)


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
    """``str(plan)``: the steps, then every layer with what the plan does with it, then
    the warnings (long lines wrapped at :data:`WIDTH` characters)."""
    lines = [f"round {self.round}: {len(self.layers)} layer(s) to compress; "
             f"{len(self.steps)} step(s) in all"]
    for i, step in enumerate(self.steps):
        lines += _wrap(", ".join(f"{n} (round {r})" for r, n in step), f"  step {i}: ", "    ")
    for e in self.entries:
        if e.status == "compress":
            what = f"rule {e.rule}: {e.decomposition} / {e.rank_rule}"
        else:
            what = f"{e.status}" + (f" ({e.reason})" if e.reason else "")
        head = f"  {e.name:<40} {e.type:<16} "
        if len(head) + len(what) <= WIDTH:
            lines.append(head + what)
        else:  # a long reason: on lines of its own, under the layer
            lines.append(head + e.status)
            lines += _wrap(e.reason, "      ")
    for w in self.warnings:
        lines += _wrap(w, "  warning: ", "    ")
    return "\n".join(lines)
