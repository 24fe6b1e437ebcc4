"""The musco command line: plugins, plan, compress (step by step), inspect, one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import musco_core as musco
from musco_core.cli import build_parser as _real_build_parser
from musco_core.cli import main

MODELS = '''
import torch
from torch import nn

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))
'''

SPEC = '''
layers_per_step = 1
rounds = 2
exclude = ["4"]

[[rules]]
match = "linear"
decomposition = "svd"
rank = { name = "param_reduction", rate = 1.5 }
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "cli_models.py").write_text(MODELS)
    (tmp_path / "spec.toml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("cli_models", None)


ARGS = ["cli_models:mlp", "--spec", "spec.toml", "--input-shape", "1,64"]


def test_plugins(capsys):
    assert main(["plugins", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert "svd" in {r["name"] for r in table["decompositions"]}
    assert main(["plugins"]) == 0
    assert "param_reduction" in capsys.readouterr().out


def test_plan_changes_nothing_and_shows_counts(workdir, capsys):
    assert main(["plan", *ARGS]) == 0
    out = capsys.readouterr().out
    assert "4 step(s) in all" in out and "excluded (matches '4')" in out
    assert "4.16k -> 2.75k" in out  # 64*64+64 params -> rank 21 * 128 + 64


def test_compress_step_by_step_then_inspect(workdir, capsys):
    assert main(["compress", *ARGS, "-o", "out", "--steps", "1", "-q"]) == 0
    assert "1 step(s) run, 3 step(s) left" in capsys.readouterr().err
    assert main(["compress", *ARGS, "-o", "out", "-q"]) == 0
    assert "resuming" in capsys.readouterr().err
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["done"] and len(report["steps"]) == 4
    assert main(["inspect", "out"]) == 0
    out = capsys.readouterr().out
    assert "4 replacement(s)" in out and "round 2  2" in out

    from cli_models import mlp

    model = musco.load_compressed(mlp(), workdir / "out" / "state.musco")
    assert model[0].rank == 13 and model(torch.randn(2, 64)).shape == (2, 10)


@pytest.mark.parametrize("args, message", [
    (["plan", "nosuch:mlp", "--spec", "spec.toml", "--input-shape", "1,64"],
     "cannot import 'nosuch'"),
    (["plan", "cli_models:nope", "--spec", "spec.toml", "--input-shape", "1,64"],
     "'cli_models' has no attribute 'nope'"),
    (["plan", "missing.pt", "--spec", "spec.toml", "--input-shape", "1,64"],
     "neither package.module:factory nor a file"),
    (["plan", *ARGS[:1], "--spec", "nospec.toml", "--input-shape", "1,64"], "nospec.toml"),
    (["inspect", "nowhere"], "no musco state file at nowhere"),
])
def test_bad_arguments_give_one_line_errors(workdir, capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_spec_errors_are_reported_without_traceback(workdir, capsys):
    (workdir / "bad.toml").write_text(SPEC.replace('"linear"', '"lineer"'))
    assert main(["plan", "cli_models:mlp", "--spec", "bad.toml", "--input-shape", "1,64"]) == 2
    err = capsys.readouterr().err
    assert "unknown matcher 'lineer'; did you mean 'linear'?" in err and "Traceback" not in err


def test_bad_input_shape_is_an_argparse_error(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *ARGS[:3], "--input-shape", "1,x"])
    assert exit_info.value.code == 2
    assert "expected sizes like 1,3,224,224, got '1,x'" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_an_input_shape_the_model_cannot_take_is_one_line(workdir, capsys):
    assert main(["plan", *ARGS[:3], "--input-shape", "1,63"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("musco plan: error: could not run MODEL 'cli_models:mlp' on an example "
                          "input of shape 1,63 (--input-shape): RuntimeError: ")


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", "{bad", "bad.json: invalid JSON: Expecting property name"),
    ("bad.yaml", "rules: [\n  - {", "bad.yaml: invalid YAML: "),
    ("bad.yaml", "1: 2\nrules: []", "bad.yaml: keys must be strings, got 1 (int) @ $"),
    ("bad.toml", "layers_per_step = 2.5\nrounds = '2'\nrules = []",
     "2 problems in the spec: bad.toml: expected an integer, got 2.5 @ $.layers_per_step; "
     "bad.toml: expected an integer, got '2' @ $.rounds"),
])
def test_bad_spec_files_are_one_line(workdir, capsys, name, text, message):
    (workdir / name).write_text(text)
    assert main(["plan", *ARGS[:1], "--spec", name, "--input-shape", "1,64"]) == 2
    assert message in one_line_error(capsys)


def test_unexpected_errors_are_one_line_unless_asked_for_the_traceback(workdir, capsys,
                                                                         monkeypatch):
    def fail(args):
        raise ZeroDivisionError("a bug\nover two lines")

    monkeypatch.setattr("musco_core.cli.build_parser", _parser_with(fail))
    assert main(["inspect", "x"]) == 2
    assert one_line_error(capsys) == "musco inspect: error: ZeroDivisionError: a bug over two lines\n"
    monkeypatch.setenv("MUSCO_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["inspect", "x"])


def _parser_with(run):
    def build():
        parser = _real_build_parser()
        parser.set_defaults(run=run)
        for action in parser._subparsers._group_actions:
            for sub in action.choices.values():
                sub.set_defaults(run=run)
        return parser

    return build



class _ClosedPipe:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise OSError("no file")


def test_a_closed_output_pipe_ends_quietly(workdir, capsys, monkeypatch):
    assert main(["compress", *ARGS, "-o", "out", "--steps", "1", "-q"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["inspect", "out"]) == 141
    assert main(["plugins"]) == 141
    assert capsys.readouterr().err == ""


def test_a_closed_pipe_in_a_real_process(workdir):
    import subprocess

    process = subprocess.Popen([sys.executable, "-m", "musco_core.cli", "plugins"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `musco plugins | head -0`: the reader is gone
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_plugins_lists_broken_plugins(capsys, monkeypatch):
    from musco_core import registry as musco_registry

    fake = musco_registry.Registry()
    fake.broken.append(musco_registry.BrokenPlugin(
        name="raising", distribution="musco-raising", error="RuntimeError: boom"))
    monkeypatch.setattr(musco_registry, "_default", fake)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken (skipped" in out
    assert any(line.split()[:3] == ["raising", "musco-raising", "RuntimeError:"]
               for line in out.splitlines())
    assert main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["broken"] == [
        {"name": "raising", "distribution": "musco-raising", "error": "RuntimeError: boom"}]


def test_plan_shows_the_ranks_and_sensitivity_a_budget_chose(workdir, capsys):
    (workdir / "budget.toml").write_text('''
exclude = ["4"]

[[rules]]
match = "linear"
decomposition = "svd"
rank = { name = "budget", param_reduction = 1.5, grid = 3 }
''')
    assert main(["plan", "cli_models:mlp", "--spec", "budget.toml", "--input-shape", "4,64"]) == 0
    out = capsys.readouterr().out
    assert "rule 0 (budget): how each layer's rank was chosen" in out
    table = out.split("how each layer's rank was chosen\n", 1)[1].splitlines()
    assert table[0].startswith("budget: param_reduction 1.5x over 2 layers: params 8.32k -> ")
    assert table[1].split()[:4] == ["layer", "full", "floor", "rank"]
    assert [row.split()[0] for row in table[2:4]] == ["0", "2"]
