"""First-party layer matchers: by layer type and kernel, and by dotted name."""

from __future__ import annotations

import fnmatch
import re

import attrs
from torch import nn

from musco_core import Matcher


class LinearMatcher(Matcher):
    """Every ``nn.Linear``."""

    name = "linear"
    summary = "nn.Linear layers"

    def matches(self, name, module, params) -> bool:
        return isinstance(module, nn.Linear)


class Conv1x1Matcher(Matcher):
    """Every ``nn.Conv2d`` with a 1x1 kernel."""

    name = "conv1x1"
    summary = "nn.Conv2d layers with a 1x1 kernel"

    def matches(self, name, module, params) -> bool:
        return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


class ConvKxKMatcher(Matcher):
    """Every ``nn.Conv2d`` whose kernel is larger than 1 in at least one dimension."""

    name = "conv_kxk"
    summary = "nn.Conv2d layers with a kernel larger than 1x1"

    def matches(self, name, module, params) -> bool:
        return isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1


class Conv1dMatcher(Matcher):
    """Every ``nn.Conv1d`` (kernel 1 for ``svd1d``, larger for ``tucker2_1d``)."""

    name = "conv1d"
    summary = "nn.Conv1d layers (any kernel size)"

    def matches(self, name, module, params) -> bool:
        return isinstance(module, nn.Conv1d)


class Conv1dK1Matcher(Matcher):
    """Every ``nn.Conv1d`` with kernel size 1 (for ``svd1d``)."""

    name = "conv1d_k1"
    summary = "nn.Conv1d layers with kernel size 1"

    def matches(self, name, module, params) -> bool:
        return isinstance(module, nn.Conv1d) and module.kernel_size[0] == 1


class Conv1dKxKMatcher(Matcher):
    """Every ``nn.Conv1d`` with a kernel larger than 1 (for ``tucker2_1d``)."""

    name = "conv1d_kxk"
    summary = "nn.Conv1d layers with a kernel larger than 1"

    def matches(self, name, module, params) -> bool:
        return isinstance(module, nn.Conv1d) and module.kernel_size[0] > 1


class HFConv1DMatcher(Matcher):
    """Every ``transformers`` ``Conv1D`` (GPT-2 family), recognised without importing transformers."""

    name = "hf_conv1d"
    summary = "transformers' Conv1D layers (GPT-2 family), by class name and structure"

    def matches(self, name, module, params) -> bool:
        from musco_std.hf_conv1d import is_hf_conv1d

        return is_hf_conv1d(module)


class RecurrentMatcher(Matcher):
    """Every ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``."""

    name = "recurrent"
    summary = "nn.LSTM, nn.GRU and nn.RNN layers"

    def matches(self, name, module, params) -> bool:
        return isinstance(module, (nn.LSTM, nn.GRU, nn.RNN))


@attrs.frozen
class PatternParams:
    #: The pattern matched against the layer's dotted name (``features.3``).
    pattern: str = attrs.field(validator=attrs.validators.instance_of(str))


class GlobMatcher(Matcher):
    """Layers whose dotted name matches a shell-style pattern (``layer4.*.conv2``)."""

    name = "glob"
    summary = "dotted layer name matches a glob pattern, e.g. 'layer4.*'"
    Params = PatternParams

    def matches(self, name, module, params) -> bool:
        return fnmatch.fnmatchcase(name, params.pattern)


def _compiles(instance, attribute, value) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None


@attrs.frozen
class RegexParams:
    #: A regular expression searched for in the layer's dotted name (use ^...$ to anchor).
    pattern: str = attrs.field(validator=[attrs.validators.instance_of(str), _compiles])


class RegexMatcher(Matcher):
    """Layers whose dotted name contains a match of a regular expression (``re.search``)."""

    name = "regex"
    summary = "dotted layer name matches a regular expression (re.search)"
    Params = RegexParams

    def matches(self, name, module, params) -> bool:
        return re.search(params.pattern, name) is not None


def _optional_str(instance, attribute, value) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{attribute.name!r} must be a string or None, got {value!r}")


@attrs.frozen
class FactorizedParams:
    #: Only layers factorized by this decomposition family (``"svd"``, ``"tucker2"`` ...).
    by: str | None = attrs.field(default=None, validator=_optional_str)
    #: Only layers whose dotted name matches this glob pattern.
    pattern: str | None = attrs.field(default=None, validator=_optional_str)


class FactorizedMatcher(Matcher):
    """Layers that a decomposition already factorized (for rules of a later round).

    A factorized module class names its family in ``musco_decomposition``;
    ``by`` selects a family and ``pattern`` a part of the model, so a spec can
    say "round 2: only the Tucker-2 layers of layer4".
    """

    name = "factorized"
    summary = "layers already factorized (optionally by=decomposition, pattern=glob)"
    Params = FactorizedParams

    def matches(self, name, module, params) -> bool:
        family = getattr(module, "musco_decomposition", None)
        if not family or (params.by is not None and family != params.by):
            return False
        return params.pattern is None or fnmatch.fnmatchcase(name, params.pattern)


@attrs.frozen
class TypeParams:
    #: A class name; matches instances of that class or of a subclass (``"Conv2d"``).
    #: (Not ``name``: in a spec's table that key names the matcher itself.)
    class_name: str = attrs.field(validator=attrs.validators.instance_of(str))


class TypeMatcher(Matcher):
    """Layers whose class, or one of its base classes, has the given name.

    In a spec: ``match = { name = "type", class_name = "Conv1d" }``.
    """

    name = "type"
    summary = "layers of a class (or subclass) by class name, e.g. class_name='Conv1d'"
    Params = TypeParams

    def matches(self, name, module, params) -> bool:
        return any(cls.__name__ == params.class_name for cls in type(module).__mro__)


MATCHERS = (
    LinearMatcher(), Conv1x1Matcher(), ConvKxKMatcher(), GlobMatcher(), RegexMatcher(),
    FactorizedMatcher(), TypeMatcher(), Conv1dMatcher(), Conv1dK1Matcher(), Conv1dKxKMatcher(),
    HFConv1DMatcher(), RecurrentMatcher(),
)
