"""RunReport.plot / musco inspect --plot: a picture of the run."""

from __future__ import annotations

import sys

import pytest

import musco_core as musco
from musco_core.cli import main
from musco_core.plot import model_totals, report_from_state

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = musco.Spec.from_toml("""
layers_per_step = 2
exclude = ["classifier", "stem"]

[[rules]]
match = "conv_kxk"
decomposition = "tucker2"
rank = { name = "param_reduction", rate = 1.5 }

[[rules]]
match = ["linear", "conv1x1"]
decomposition = "svd"
rank = { name = "param_reduction", rate = 1.5 }
""")


@pytest.fixture
def run(tiny_resnet, example_inputs):
    compressor = musco.Compressor(tiny_resnet, SPEC, example_inputs=example_inputs)
    while not compressor.done:
        compressor.step()
    return compressor


def test_model_totals_follow_the_steps(run):
    report = run.report()
    rows = model_totals(report)
    assert len(rows) == len(report.steps) + 1
    assert rows[0][1] == report.model_params_before and rows[-1][1] == report.model_params_after
    assert [p for _, p, _ in rows] == sorted((p for _, p, _ in rows), reverse=True)


def test_plot_writes_a_png(run, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    fig = run.report().plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 4
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == list(run.report().layers)          # one row per compressed layer
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"after: tucker2", "after: svd"} <= set(legend)


def test_inspect_plot_from_a_state_file(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run.save(tmp_path / "state.musco")
    state = musco.persist.read_state(tmp_path / "state.musco")
    assert report_from_state(state).model_params_after == run.report().model_params_after
    assert main(["inspect", str(tmp_path), "--plot", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "picture of the run" in capsys.readouterr().out


def test_without_matplotlib_the_error_says_how_to_install(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"musco\[plot\]"):
        run.report().plot(tmp_path / "x.png")
    run.save(tmp_path / "state.musco")
    assert main(["inspect", str(tmp_path), "--plot", str(tmp_path / "x.png")]) == 2
    assert "musco[plot]" in capsys.readouterr().err
