"""The deprecated ``Refine(steps=..., scope=...)`` form: its checks and the new form it means.

Loaded only when a spec uses the old form (it keeps loading for one release).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs


def _non_negative_number(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{attribute.name!r} must be a number >= 0, got {value!r}")


def _optional_positive_number(instance, attribute, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0):
        raise ValueError(f"{attribute.name!r} must be a number > 0 or None, got {value!r}")


@attrs.frozen
class LegacyRefine:
    """The deprecated ``Refine(steps=..., scope=...)`` form, only to check its values."""

    steps: int = attrs.field(default=0, validator=[attrs.validators.instance_of(int),
                                                   attrs.validators.ge(0)])
    seconds: float | None = attrs.field(default=None, validator=_optional_positive_number)
    lr: float = attrs.field(default=1e-4, validator=_non_negative_number)
    seed: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))
    scope: str = attrs.field(default="layer", validator=attrs.validators.in_(("layer", "model")))


#: The refiner each ``scope`` of the deprecated form stands for.
LEGACY_REFINERS = {"layer": "layer_output", "model": "model_output"}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def convert(legacy: LegacyRefine, given: Iterable[str], form: str,
            ) -> tuple[str, dict[str, Any], bool, str]:
    """``(refiner name, params, off, deprecation message)`` of the old form.

    ``form`` is ``"python"`` (``Refine(steps=...)``) or ``"table"`` (a refine table
    without ``name``), so the message shows the new form in the same notation.
    """
    given = list(given)
    name = LEGACY_REFINERS[legacy.scope]
    params: dict[str, Any] = {"steps": legacy.steps}
    params.update({k: getattr(legacy, k) for k in ("seconds", "lr", "seed")
                   if k in given and getattr(legacy, k) is not None})
    params.update({k: float(params[k]) for k in ("seconds", "lr") if k in params})
    off = legacy.steps == 0
    python = f"Refine({', '.join([repr(name)] + [f'{k}={v!r}' for k, v in params.items()])})"
    toml = "{ " + ", ".join(f"{k} = {toml_value(v)}"
                            for k, v in {"name": name, **params}.items()) + " }"
    if form == "table":
        old = ", ".join(f"{k} = {toml_value(getattr(legacy, k))}" for k in given)
        old = f"a refine table without 'name' ({{ {old} }})"
    else:
        old = f"Refine({', '.join(f'{k}={getattr(legacy, k)!r}' for k in given)})"
    if off:
        new = ("refinement is off without steps: leave refine out (Spec.refine = None), or "
               f"turn it on with e.g. Refine({name!r}, steps=100)")
    elif form == "table":
        new = f"write refine = {toml} (in Python: {python})"
    else:
        new = f"write {python} (in TOML: refine = {toml})"
    return name, params, off, f"{old} is deprecated; {new}"
