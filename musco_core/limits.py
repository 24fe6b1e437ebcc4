"""Rank limits every rank rule accepts: ``round_to``, ``min_rank`` and ``max_rank``."""

from __future__ import annotations

import math
from typing import Any

import attrs

from musco_core.strategies import Rank

#: Keys of a rank rule's spec parameters that the engine handles for every rule.
LIMIT_KEYS = ("round_to", "min_rank", "max_rank")

ROUNDING = ("down", "up", "nearest")


def _positive_int_or_none(instance, attribute, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name!r} must be a positive int, got {value!r}")


@attrs.frozen
class RankLimits:
    """Applied to the rank a rule chose, component by component, in this order:

    1. ``round_to``: round to a multiple (tensor cores idle on odd channel counts;
       8, 16 or 32 are typical). The direction is the rule's ``rounding``:
       ``"down"`` for reduction targets (so the target still holds), ``"up"`` for
       rules that promise to keep something (energy), ``"nearest"`` otherwise.
       A rank never rounds to 0: the smallest result is ``round_to`` itself.
    2. ``min_rank`` / ``max_rank``: clamps (they win over a reduction target).
    3. The layer's full rank caps everything.
    """

    round_to: int | None = attrs.field(default=None, validator=_positive_int_or_none)
    min_rank: int | None = attrs.field(default=None, validator=_positive_int_or_none)
    max_rank: int | None = attrs.field(default=None, validator=_positive_int_or_none)

    def __attrs_post_init__(self) -> None:
        if self.min_rank is not None and self.max_rank is not None and self.min_rank > self.max_rank:
            raise ValueError(
                f"'min_rank' ({self.min_rank}) must not exceed 'max_rank' ({self.max_rank})"
            )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.round_to, self.min_rank, self.max_rank))

    def _one(self, r: int, full: int, rounding: str) -> int:
        m = self.round_to
        if m:
            q = r / m
            k = math.floor(q) if rounding == "down" else math.ceil(q) if rounding == "up" else round(q)
            r = max(m, k * m)
        if self.min_rank is not None:
            r = max(r, self.min_rank)
        if self.max_rank is not None:
            r = min(r, self.max_rank)
        return max(1, min(r, full))

    def apply(self, rank: Rank, full: Rank, rounding: str = "nearest") -> Rank:
        """``rank`` after rounding and clamping, each component capped by ``full``."""
        if not self.active:
            return rank
        if isinstance(rank, int):
            return self._one(rank, full if isinstance(full, int) else min(full), rounding)
        fulls: Any = full if not isinstance(full, int) else (full,) * len(rank)
        return tuple(self._one(r, f, rounding) for r, f in zip(rank, fulls))
