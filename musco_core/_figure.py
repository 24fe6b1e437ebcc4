"""The drawing behind :meth:`RunReport.plot` and :func:`musco_core.plot.plot_run`.

A leaf module: it needs nothing of musco at run time, only the report it is handed, so
:mod:`musco_core.report` can call it without importing the plot adapter (which imports
the report). matplotlib is imported only when a picture is drawn. Use it through
``RunReport.plot(path)`` or :mod:`musco_core.plot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from musco_core.report import RunReport

__all__ = ["model_totals", "plot_run"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)  # no display needed; keeps an interactive one
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "plotting a run needs matplotlib: pip install 'musco[plot]' (or pip install "
            f"matplotlib); the import failed with: {exc}"
        ) from exc
    return plt


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _rank_label(rank: Any) -> str:
    if isinstance(rank, (tuple, list)):
        return "x".join(map(str, rank))
    return str(rank)


def model_totals(report: RunReport) -> list[tuple[int, int, int]]:
    """``[(step, model params, model FLOPs)]``: the whole model before the run, then after each step.

    FLOPs are 0 when the report does not know the model's FLOPs.
    """
    params, flops = report.model_params_before, report.model_flops_before
    rows = [(-1, params, flops)]
    for step in report.steps:
        for r in step.compressed:
            params -= r.params_before - r.params_after
            flops -= r.flops_before - r.flops_after
        rows.append((step.step, params, flops if report.model_flops_before else 0))
    return rows


def plot_run(report: RunReport, path: str | Path | None = None, *, title: str | None = None):
    """Draw ``report`` and save it to ``path`` (format from the suffix: .png, .svg, .pdf).

    Top row, one bar pair per compressed layer (its state before its first
    compression and after its latest): parameters and FLOPs, the "after" bars coloured
    by decomposition and labelled with the rank, and the relative weight error
    (output error on the calibration data as well, when there is one). Bottom: the
    whole model's parameters and FLOPs after each step, as a share of the original.
    Returns the matplotlib ``Figure``.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    layers = report.layers
    names = list(layers)
    n = max(len(names), 1)
    fig = plt.figure(figsize=(13, 2.8 + 0.32 * n + 2.6), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1.0 + 0.32 * n, 2.6],
                            width_ratios=[1.2, 1.2, 0.9])
    ax_params, ax_flops, ax_err = (fig.add_subplot(grid[0, i]) for i in range(3))
    ax_steps = fig.add_subplot(grid[1, :])

    decompositions = sorted({last.decomposition for _, last in layers.values()})
    cmap = plt.get_cmap("tab10")
    colour = {d: cmap(i % 10) for i, d in enumerate(decompositions)}
    y = list(range(len(names)))
    h = 0.38

    for ax, key, label in ((ax_params, "params", "parameters"), (ax_flops, "flops", "FLOPs")):
        before = [getattr(layers[nm][0], f"{key}_before") for nm in names]
        after = [getattr(layers[nm][1], f"{key}_after") for nm in names]
        ax.barh([v - h / 2 for v in y], before, height=h, color="0.78", label="before")
        ax.barh([v + h / 2 for v in y], after, height=h,
                color=[colour[layers[nm][1].decomposition] for nm in names], label="after")
        top = max(before + after, default=1) or 1
        for v, b, a, nm in zip(y, before, after, names):
            ratio = f"{b / a:.1f}x" if a else "-"
            text = f" {ratio}" if key == "flops" else f" r={_rank_label(layers[nm][1].rank)}, {ratio}"
            ax.text(a, v + h / 2, text, va="center", fontsize=7)
        ax.set_xlim(0, top * 1.35)
        ax.set_title(f"{label} per layer (before / after)", fontsize=10)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: _count(x)))
        ax.set_yticks(y, names if ax is ax_params else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)

    errors = [layers[nm][1].rel_error for nm in names]
    ax_err.barh(y, [e or 0.0 for e in errors], height=0.6,
                color=[colour[layers[nm][1].decomposition] for nm in names])
    outputs = [layers[nm][1].output_error for nm in names]
    if any(o is not None for o in outputs):
        ax_err.scatter([o for o in outputs if o is not None],
                       [v for v, o in zip(y, outputs) if o is not None],
                       marker="D", color="black", s=14, zorder=3, label="output error")
    ax_err.set_yticks(y, [""] * len(names))
    ax_err.invert_yaxis()
    ax_err.set_title("relative error (weights)", fontsize=10)
    ax_err.grid(axis="x", alpha=0.3)

    handles = [Patch(color="0.78", label="before")]
    handles += [Patch(color=colour[d], label=f"after: {d}") for d in decompositions]
    if any(o is not None for o in outputs):
        handles.append(Line2D([], [], marker="D", color="black", linestyle="", label="output error"))
    ax_params.legend(handles=handles, fontsize=8, loc="upper right")

    totals = model_totals(report)
    xs = list(range(len(totals)))
    p0 = totals[0][1] or 1
    ax_steps.plot(xs, [100 * p / p0 for _, p, _ in totals], marker="o", label="parameters")
    for x, (_, p, _) in zip(xs, totals):
        ax_steps.annotate(_count(p), (x, 100 * p / p0), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=7)
    if report.model_flops_before:
        f0 = report.model_flops_before
        ax_steps.plot(xs, [100 * f / f0 for _, _, f in totals], marker="s", label="FLOPs")
    ax_steps.set_xticks(xs, ["start"] + [f"step {s}" for s, _, _ in totals[1:]], fontsize=8)
    ax_steps.set_ylabel("% of the original model")
    ax_steps.set_ylim(0, 110)
    ax_steps.set_title("whole model after each step", fontsize=10)
    ax_steps.grid(alpha=0.3)
    ax_steps.legend(fontsize=8)

    t = report.totals()
    fig.suptitle(title or (
        f"{len(report.steps)} step(s), {len(names)} layer(s): model params "
        f"{_count(report.model_params_before)} -> {_count(report.model_params_after)}"
        + (f", FLOPs {_count(report.model_flops_before)} -> {_count(report.model_flops_after)}"
           if report.model_flops_before else "")
        + f"; compressed layers {_count(t['params_before'])} -> {_count(t['params_after'])} params"),
        fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
