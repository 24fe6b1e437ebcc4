"""The docs stay true: their code runs, the hook reference is current, every hook is tested."""

from __future__ import annotations

import inspect
import re
import runpy
from pathlib import Path

import pytest

import musco_core as musco
from musco_core import hookspecs

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks(path: Path, lang: str) -> list[str]:
    return [code for kind, code in FENCE.findall(path.read_text()) if kind == lang]


@pytest.mark.parametrize("page", ["README.md", "docs/user-guide.md", "docs/plugin-guide.md",
                                  "docs/migrating-from-musco-pytorch.md"])
def test_python_blocks_run_as_written(page, capsys):
    namespace: dict = {"__name__": "__docs__"}
    for code in blocks(ROOT / page, "python"):
        exec(compile(code, page, "exec"), namespace)


def test_readme_toml_is_the_quick_start_spec():
    namespace: dict = {"__name__": "__docs__"}
    exec(blocks(ROOT / "README.md", "python")[0], namespace)
    (toml,) = blocks(ROOT / "README.md", "toml")
    assert musco.Spec.from_toml(toml) == namespace["spec"]


def test_readme_names_the_commands_ci_runs():
    ci = (ROOT / ".ci/run").read_text()
    install = blocks(ROOT / "README.md", "bash")
    assert install[0].strip() in ci and install[1].strip() in ci


def test_hook_reference_is_current():
    render = runpy.run_path(str(ROOT / "docs/gen_hooks.py"))["render"]
    assert (ROOT / "docs/hooks.md").read_text() == render(), "run: python docs/gen_hooks.py"


HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
         if name.startswith("musco_")]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_and_has_a_test_named_after_it(hook):
    assert f"## `{hook}`" in (ROOT / "docs/hooks.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert f"def test_{hook}(" in tests
