"""The staged compression engine: the loop (:class:`Compressor`), the step transaction, the state."""

from musco_core.engine.compressor import Compressor

__all__ = ["Compressor"]
