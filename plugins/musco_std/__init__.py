"""musco's first-party strategies: decompositions, rank rules and layer matchers.

Nothing here is imported by ``musco_core``; the strategies reach the registry
through the ``musco`` entry point ``musco_std = "musco_std.plugin"``.
"""

from musco_std.cp import CP3, CP4, CP3Conv2d, CP4Conv2d
from musco_std.svd import SVD, SVDConv1x1, SVDLinear
from musco_std.tucker2 import Tucker2, Tucker2Conv2d

__all__ = [
    "CP3", "CP3Conv2d", "CP4", "CP4Conv2d", "SVD", "SVDConv1x1", "SVDLinear", "Tucker2",
    "Tucker2Conv2d",
]
