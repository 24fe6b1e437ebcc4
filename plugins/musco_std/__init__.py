"""musco's first-party strategies: decompositions, rank rules and layer matchers.

Nothing here is imported by ``musco_core``; the strategies reach the registry
through the ``musco`` entry point ``musco_std = "musco_std.plugin"``.
"""

from musco_std.svd import SVD, SVDConv1x1, SVDLinear

__all__ = ["SVD", "SVDConv1x1", "SVDLinear"]
