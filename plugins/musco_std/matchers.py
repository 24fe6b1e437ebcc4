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


MATCHERS = (LinearMatcher(), Conv1x1Matcher(), ConvKxKMatcher(), GlobMatcher(), RegexMatcher())
