"""The musco command line: plugins, plan, compress (step by step), inspect, one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import musco_core as musco
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
    (workdir / "bad.toml").write_text(SPEC.replace('"svd"', '"svdd"'))
    assert main(["plan", "cli_models:mlp", "--spec", "bad.toml", "--input-shape", "1,64"]) == 2
    err = capsys.readouterr().err
    assert "unknown decomposition 'svdd'; did you mean 'svd'?" in err and "Traceback" not in err


def test_bad_input_shape_is_an_argparse_error(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *ARGS[:3], "--input-shape", "1,x"])
    assert exit_info.value.code == 2
    assert "expected sizes like 1,3,224,224, got '1,x'" in capsys.readouterr().err
