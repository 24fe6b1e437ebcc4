"""A spec's text forms: parsing TOML, YAML and JSON, reading spec files, writing TOML.

Only plain data crosses this module (dicts, lists, scalars); :class:`musco_core.Spec`
turns it into spec objects. Every problem is a :class:`SpecError`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from musco_core.errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Spec file suffixes and the text format of each.
FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def parse(text: str, form: str) -> Any:
    """The plain data of spec text in ``form`` (``"toml"``, ``"yaml"`` or ``"json"``)."""
    if form == "toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"invalid TOML: {exc}") from None
        except RecursionError:
            raise SpecError("invalid TOML: nested too deeply") from None
    if form == "yaml":
        try:
            import yaml
        except ImportError:
            raise ImportError("Spec.from_yaml needs PyYAML: pip install 'musco[yaml]'") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"invalid YAML: {exc}") from None
        except RecursionError:
            raise SpecError("invalid YAML: nested too deeply") from None
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp like 2001-02-30
            raise SpecError(f"invalid YAML: {exc}") from None
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise SpecError("invalid JSON: nested too deeply") from None


def read(path: Path) -> tuple[str, str]:
    """``(form, text)`` of a spec file; an unknown suffix or non-UTF-8 text is a SpecError."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise SpecError(
            f"unknown spec file type {suffix!r} for {path}; use .toml, .yaml or .json")
    try:
        return FORMATS[suffix], path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text: {exc}") from None


def to_toml(data: Mapping[str, Any]) -> str:
    """TOML text of a spec's dict form (TOML has no null: a ``None`` is a SpecError)."""
    import tomli_w

    _reject_none(data, "$")
    return tomli_w.dumps(data)


def _reject_none(value: Any, path: str) -> None:
    if value is None:
        raise SpecError(
            f"TOML has no null, so None cannot be written @ {path}; leave such a layer out "
            "with Spec.exclude, or write the spec as YAML or JSON"
        )
    if isinstance(value, Mapping):
        for k, v in value.items():
            _reject_none(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_none(v, f"{path}[{i}]")


def key_problems(value: Any, path: str) -> list[str]:
    """Every mapping key that is not a string (YAML's ``1: 2``), with its path."""
    problems: list[str] = []
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, Mapping):
            for k, v in item.items():
                if not isinstance(k, str):
                    problems.append(f"keys must be strings, got {k!r} ({type(k).__name__}) "
                                    f"@ {where}")
                else:
                    stack.append((v, f"{where}.{k}"))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return sorted(problems)
