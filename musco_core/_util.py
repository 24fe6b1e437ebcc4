"""Small helpers every layer of the core shares: first tensor, device, progress, output error."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in ``value`` (a tensor, or tuples, lists and dicts of them), or ``None``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, Mapping):
        return first_tensor(list(value.values()))
    return None


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def progress(iterable: Iterable[Any], show: bool, desc: str | None = None,
             total: int | None = None, unit: str = "it") -> Iterable[Any]:
    """``iterable`` with a tqdm progress bar when ``show`` (left off the screen when done)."""
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)


class OutputError:
    """The relative output error ``sqrt(sum |Y - Y'|^2 / sum |Y|^2)``, accumulated over batches.

    The one definition of the quantity every output error in musco reports (layer
    outputs, the model's output, a budget's damage, which is its square). Sums in
    float64; with a zero reference the absolute error is returned.
    """

    def __init__(self) -> None:
        self.diff = 0.0
        self.total = 0.0

    def add(self, output: torch.Tensor, reference: torch.Tensor) -> None:
        y, ref = output.detach().double(), reference.detach().double()
        self.diff += float(torch.sum((y - ref) ** 2))
        self.total += float(torch.sum(ref ** 2))

    @property
    def value(self) -> float:
        return (self.diff / self.total) ** 0.5 if self.total > 0 else self.diff ** 0.5
