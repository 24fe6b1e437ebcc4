"""Why a grouped or depthwise convolution cannot be factorized: one message for every conv plugin."""

from __future__ import annotations

from torch import nn


def group_problem(name: str, module: nn.Module, decomposition: str) -> str | None:
    """The reason ``decomposition`` cannot factorize a grouped conv ``module``, or ``None``.

    ``None`` for ``groups=1`` (and for modules without ``groups``). A depthwise
    convolution (``groups == in_channels``) gives each output channel a single
    input channel: its weight is a stack of tiny ``1 x k`` filters with no channel
    rank to cut, so it is skipped rather than factorized. Other grouped
    convolutions are block-diagonal across groups; a per-group decomposition is
    possible in principle but not implemented, and a decomposition of the whole
    weight would destroy the block structure.

    Both messages name the layer, the value of ``groups`` and what to do: exclude
    the layer, narrow the rule's match, or set ``unsupported = "skip"`` on the rule.
    """
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return None
    cin, cout = module.in_channels, module.out_channels
    kernel = tuple(module.kernel_size)
    if groups == cin:
        return (
            f"layer {name!r}: decomposition {decomposition!r} skips depthwise convolutions "
            f"(groups=in_channels={cin}, out_channels={cout}, kernel_size={kernel}): each "
            f"output channel reads one input channel, so there is no channel rank to cut; "
            f"exclude the layer or set unsupported='skip' on the rule"
        )
    return (
        f"layer {name!r}: decomposition {decomposition!r} does not support grouped "
        f"convolutions (groups={groups}: {cin // groups} input and {cout // groups} output "
        f"channels per group); only groups=1 is supported (per-group decomposition is not "
        f"implemented): exclude the layer or set unsupported='skip' on the rule"
    )
