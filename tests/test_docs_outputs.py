"""The outputs the docs show are what their code prints, and the docs say what is so.

A fenced block tagged ``output`` shows what the ``python`` block just before it prints
(all of it). The test runs every ``python`` block of the page in order, as
``tests/test_docs.py`` does, and compares; only timings (``0.08s``) are normalised.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import warnings
from pathlib import Path

import pytest
import torch

from musco_core.errors import MuscoWarning

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
#: Pages whose shown outputs are checked; each must show at least one.
PAGES = ["README.md", "docs/user-guide.md"]


def fences(path: Path) -> list[tuple[str, str]]:
    return [(lang, code) for lang, code in FENCE.findall(path.read_text())]


def normalise(text: str) -> str:
    """Timings (``0.08s``, ``12.50s``) become ``0.00s``; trailing blanks go."""
    text = re.sub(r"\b\d+\.\d+s\b", "0.00s", text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@pytest.mark.parametrize("page", PAGES)
def test_shown_outputs_are_what_the_code_prints(page):
    namespace: dict = {"__name__": "__docs__"}
    printed: str | None = None
    shown = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MuscoWarning)
        for i, (lang, code) in enumerate(fences(ROOT / page)):
            if lang == "python":
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(code, page, "exec"), namespace)
                printed = out.getvalue()
            elif lang == "output":
                assert printed is not None, (
                    f"{page}: output block {i} does not follow a python block that prints")
                assert normalise(code) == normalise(printed), (
                    f"{page}: output block {i} is not what the code before it prints; it "
                    f"prints:\n{printed}")
                printed, shown = None, shown + 1
    assert shown, f"{page} shows no output block"


def test_readme_quick_start_warns_of_nothing():
    code = next(code for lang, code in fences(ROOT / "README.md") if lang == "python")
    with warnings.catch_warnings(record=True) as record, \
            contextlib.redirect_stdout(io.StringIO()) as out:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), {"__name__": "__docs__"})
    assert not [str(w.message) for w in record if issubclass(w.category, MuscoWarning)]
    assert "warning:" not in out.getvalue()


def test_readme_says_how_long_the_tests_take():
    text = " ".join((ROOT / "README.md").read_text().split("## Test", 1)[1]
                    .split("\n## ", 1)[0].split())
    assert "3 minutes" in text and "17 minutes" in text


def test_examples_table_lists_every_example():
    readme = (ROOT / "docs/examples/README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| [`")]
    for script in sorted((ROOT / "docs/examples").glob("*.py")):
        assert any(f"[`{script.name}`]({script.name})" in line for line in table), script.name


def test_plugin_guide_names_the_rank_rule_kit_and_the_strategies():
    guide = (ROOT / "docs/plugin-guide.md").read_text()
    for name in ("check_rank_rule", "layer_for", "compare_rank_rules",
                 "musco_core.testing.strategies", "low_rank_matrices", "conv_configs"):
        assert name in guide, name


def test_plugin_guide_property_tests_pass(tmp_path):
    """The guide's hypothesis tests, run from a real file (hypothesis reads their source)."""
    code = "\n".join(code for lang, code in fences(ROOT / "docs/plugin-guide.md")
                     if lang == "python")
    path = tmp_path / "plugin_guide_tests.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("plugin_guide_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
    assert len(tests) >= 2
    for test in tests:
        test()


def _paragraph(page: str, start: str) -> str:
    text = " ".join((ROOT / page).read_text().split())
    return text[text.index(start):][:700]


def test_the_prototype_is_quoted_right():
    data_aware = _paragraph("docs/data-aware.md", "**Quality depends on the calibration data")
    guide = _paragraph("docs/user-guide.md", "**Quality depends on the calibration data")
    for text in (data_aware, guide):
        assert "licen" in text and "0.45" in text          # the 0.45 came from licence text
        assert "movie" in text and "0.61" in text
        assert "unrelated text 0.45" not in text and "0.61 vs 0.45" not in text


def test_budget_cost_names_the_rules_own_batches():
    text = _paragraph("docs/rank-rules.md", "**The cost of measuring.**")
    assert "`batches`" in text and "max_batches" not in text


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_doc_example_{name}",
                                                  ROOT / "docs/examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minilm_walkthrough_smoke_prints_no_bare_boolean(tmp_path):
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            _load_example("minilm_walkthrough").main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    lines = out.getvalue().splitlines()
    bare = [line for line in lines if re.search(r"(^|: )(True|False)$", line.strip())]
    assert not bare, bare
