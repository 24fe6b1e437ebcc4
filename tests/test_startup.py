"""Start-up stays light: loading the plugins imports no heavy library a strategy only needs
when it runs (scipy's optimizers, tensorly); those load on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: Imported only when a strategy that needs them runs, never when the plugins load.
HEAVY = ("scipy", "scipy.optimize", "scipy.linalg", "tensorly")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, timeout=600).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_loading_the_registry_imports_no_heavy_library():
    loaded = _modules_after(
        "import musco_core\n"
        "registry = musco_core.default_registry()\n"
        "assert 'vbmf' in registry.names('rank_rules') and registry.broken == []")
    assert "musco_std.plugin" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_plugins_command_imports_no_heavy_library():
    loaded = _modules_after(
        "import contextlib, io\n"
        "from musco_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['plugins']) == 0\n"
        "assert 'vbmf' in out.getvalue()")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_a_vbmf_rank_rule_loads_scipy_when_it_runs():
    loaded = _modules_after(
        "import torch, warnings\n"
        "from torch import nn\n"
        "import musco_core as musco\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))\n"
        "spec = musco.Spec(rules=[musco.Rule(match='linear', decomposition='svd',\n"
        "                                    rank=musco.RankRule('vbmf'))])\n"
        "warnings.simplefilter('ignore')\n"
        "report = musco.Compressor(model, spec, torch.randn(2, 32)).step()\n"
        "assert report.layers\n")
    assert "scipy.optimize" in loaded


def test_startup_benchmark_smoke(tmp_path):
    script = Path(__file__).parents[1] / "docs" / "benchmarks" / "startup.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "startup.json").read_text())
    now = result["variants"]["now"]
    assert set(now["timings"]) == {"import musco_core", "first registry load",
                                   "first Compressor(...)", "first step()",
                                   "`musco plugins` (wall)"}
    assert all(row["median"] > 0 for row in now["timings"].values())
    assert now["importtime"]["heavy"] == [] and now["importtime"]["modules"] > 0
    assert "| first registry load |" in (tmp_path / "startup.md").read_text()
