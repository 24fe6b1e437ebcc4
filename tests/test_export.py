"""docs/export.md runs as written: torch.export, ONNX (onnxruntime), TorchScript, torch.compile."""

from __future__ import annotations

import importlib.util
import linecache
import re
import warnings
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "export.md"
SECTION = re.compile(r"^## (.+?)\n(.*?)(?=^## |\Z)", re.S | re.M)
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def sections() -> dict[str, str]:
    """The python code of each ``## `` section of the page, by title."""
    return {title: "".join(FENCE.findall(body)) for title, body in SECTION.findall(PAGE.read_text())}


def execute(section: str, namespace: dict) -> None:
    """Run a section's code as if from a file, so that TorchScript can read its classes' source."""
    code = sections()[section]
    assert code, f"no python block under '## {section}'"
    filename = f"<docs/export.md: {section}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    exec(compile(code, filename, "exec"), namespace)


@pytest.fixture(scope="module")
def models():
    """The namespace after the page's first section: the two compressed models."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    try:
        namespace: dict = {"__name__": "__docs__"}
        execute("Two compressed models", namespace)
    finally:
        torch.set_num_threads(threads)
    return namespace


def run(section: str, namespace: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporters warn about internals
        execute(section, dict(namespace))


def test_page_has_the_four_routes():
    assert {"`torch.export`", "ONNX, run in onnxruntime", "TorchScript",
            "`torch.compile`"} <= set(sections())


def test_torch_export(models, one_thread):
    run("`torch.export`", models)


def test_torchscript(models, one_thread):
    run("TorchScript", models)


def test_onnx_in_onnxruntime(models, one_thread):
    for name in ("onnx", "onnxruntime", "onnxscript"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install 'musco[onnx]')")
    run("ONNX, run in onnxruntime", models)


def test_torch_compile(models):
    run("`torch.compile`", models)
