"""The exceptions musco raises."""

from __future__ import annotations


class MuscoError(Exception):
    """Base class of musco's own errors."""


class SpecError(MuscoError, ValueError):
    """A spec is invalid. ``problems`` lists every problem, each starting with its path."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the spec:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class UnsupportedLayerError(MuscoError, ValueError):
    """A decomposition was asked to handle a layer it cannot factorize."""


class CompressionError(MuscoError, RuntimeError):
    """A step failed; the model was left exactly as it was before the step.

    ``layer`` is the dotted name of the failing layer and ``strategy`` the
    strategy that failed (``"decomposition 'svd'"``, ``"rank rule 'fixed'"``).
    """

    def __init__(self, message: str, *, layer: str | None = None, strategy: str | None = None):
        super().__init__(message)
        self.layer = layer
        self.strategy = strategy


class CalibrationError(MuscoError, ValueError, TypeError):
    """Calibration data that cannot be used: a bad argument, or a data source that raised.

    Raised for a ``calibration=`` argument that is not a re-iterable of batches (an
    empty list, a generator, a single tensor, a path ...), and when reading a batch
    raises (a ``DataLoader`` worker error): then ``batch`` is the index of the batch
    being read, ``step`` the step that was reading it (``None`` outside a step), the
    data source's exception is chained (``__cause__``) and the model is unchanged.
    Also a ``ValueError`` and a ``TypeError``, the types these problems raised before.
    """

    def __init__(self, message: str, *, step: int | None = None, batch: int | None = None):
        super().__init__(message)
        self.step = step
        self.batch = batch


class PluginError(MuscoError, RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


class MuscoWarning(UserWarning):
    """Something worth a look that does not stop the run (a very low rank, a model that grew)."""
