"""Saving and loading compression state: atomic files, no pickled classes, manifests.

A state file is written with :func:`torch.save` and read with
``torch.load(weights_only=True)``: it holds only tensors and plain data (the
spec as a dict, the plan, the manifest of replaced layers, statistics, reports
and the model's ``state_dict``). The structure of a compressed model is rebuilt
from the manifest on a fresh instance of the original architecture.

Integrity: the file records a CRC-32 checksum of every tensor (``"checksums"``);
reading verifies them, and the zip records' own CRCs, and raises
:class:`StateFileError` naming the damaged tensor or record. Files are written
with ordinary permissions (``0666`` less the umask, or those of the file replaced).
"""

from __future__ import annotations

import copy
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from musco_core.errors import MuscoError, SpecError, UnsupportedLayerError
from musco_core.plan import Plan
from musco_core.registry import Registry, default_registry
from musco_core.spec import Spec, format_params_error, structure_params
from musco_core.surgery import replace_module

FORMAT = "musco-state"
VERSION = 1


class StateFileError(MuscoError, ValueError):
    """A file is not a musco state file, is corrupt, or does not fit the model.

    ``field`` names the part of the state that is wrong, when one is (``"position"``,
    ``"manifest[0].decomposition"``); the message then ends with ``@ field``.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    @classmethod
    def at(cls, field: str, message: str, source: str | None = None) -> StateFileError:
        """``"<source>: <message> @ <field>"`` with :attr:`field` set."""
        prefix = f"{source}: " if source else ""
        return cls(f"{prefix}{message} @ {field}", field=field)


CHECKSUMS = "checksums"


def _tensors(value: Any, prefix: str = ""):
    """``(path, tensor)`` for every tensor in nested mappings and lists (``model.fc.weight``)."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}[{i}]")


def tensor_checksum(tensor: torch.Tensor) -> str | None:
    """CRC-32 of a tensor's dtype, shape and bytes (``None`` for tensors without plain bytes)."""
    if tensor.is_sparse or tensor.is_quantized or tensor.is_meta:
        return None
    try:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError):
        return None
    crc = zlib.crc32(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    return f"crc32:{zlib.crc32(data, crc):08x}"


def with_checksums(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with a checksum of each of its tensors under ``"checksums"``."""
    sums = {}
    for name, tensor in _tensors({k: v for k, v in state.items() if k != CHECKSUMS}):
        checksum = tensor_checksum(tensor)
        if checksum is not None:
            sums[name] = checksum
    return {**state, CHECKSUMS: sums}


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else ``0o666`` less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a partial file. A
    musco state (a mapping with the ``format`` marker) gets a checksum of each
    tensor, verified by :func:`read_state`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        obj = with_checksums(obj)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_state(path: str | Path) -> dict[str, Any]:
    """Read and check a state file written by :meth:`Compressor.save`."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"no musco state file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes torch.load raise
        raise StateFileError(
            f"{path} is not a readable musco state file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise StateFileError(f"{path} is not a musco state file (no '{FORMAT}' format marker)")
    if state.get("version") != VERSION:
        raise StateFileError(
            f"{path} has state format version {state.get('version')!r}; this musco reads "
            f"version {VERSION}"
        )
    missing = [k for k in ("spec", "manifest", "model", "position", "plan") if k not in state]
    if missing:
        raise StateFileError(f"{path} is incomplete: missing {', '.join(missing)}")
    verify_integrity(state, path)
    return dict(state)


def verify_integrity(state: Mapping[str, Any], path: str | Path) -> None:
    """Check each tensor's checksum, then the CRC of every zip record; raise StateFileError.

    Files written before checksums were recorded are checked by their zip CRCs only.
    """
    sums = state.get(CHECKSUMS)
    if sums is not None:
        if not isinstance(sums, Mapping):
            raise StateFileError(f"{path} is corrupt: its checksums are not a mapping")
        try:
            found = dict(_tensors({k: v for k, v in state.items() if k != CHECKSUMS}))
        except RecursionError:
            raise StateFileError(f"{path} is corrupt: its data is nested too deeply") from None
        for name, expected in sums.items():
            if name not in found:
                raise StateFileError(f"{path} is corrupt: tensor {name!r} is missing")
            actual = tensor_checksum(found[name])
            if actual != expected:
                raise StateFileError(
                    f"{path} is corrupt: tensor {name!r} does not match its checksum "
                    f"(expected {expected}, got {actual}); the file was damaged or changed "
                    "after it was written"
                )
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # noqa: BLE001 - a damaged directory fails zipfile in many ways
        # (BadZipFile, zlib.error, a record name that is not UTF-8: UnicodeDecodeError, ...)
        raise StateFileError(f"{path} is corrupt: its zip directory is damaged "
                             f"({type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise StateFileError(
            f"{path} is corrupt: record {bad!r} does not match its CRC; the file was damaged "
            "or changed after it was written"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_rank(value: Any) -> bool:
    """An int, or a list (or tuple) of ints: the plain form of a rank."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_int(v) for v in value)
    return _is_int(value)


def read_spec(state: Mapping[str, Any], source: str | None = None) -> Spec:
    """The spec saved in ``state``; a :class:`StateFileError` at ``spec`` if it is invalid."""
    try:
        return Spec.from_dict(state["spec"])
    except SpecError as exc:
        raise StateFileError.at(
            "spec", f"the saved spec is invalid: {'; '.join(exc.problems)}", source) from exc


def read_plan(state: Mapping[str, Any], spec: Spec, source: str | None = None) -> Plan:
    """The plan saved in ``state``, checked against ``spec`` (rounds, rule indices)."""
    data = state["plan"]
    if not isinstance(data, Mapping):
        raise StateFileError.at("plan", f"the plan must be a mapping, got {_kind(data)}", source)
    try:
        plan = Plan.from_dict(data)
    except Exception as exc:  # noqa: BLE001 - any malformed part of the plan's plain data
        raise StateFileError.at(
            "plan", f"the saved plan is unreadable ({type(exc).__name__}: {exc})", source
        ) from None
    rounds, rules = spec.rounds, len(spec.rules)
    if not 1 <= plan.round <= rounds:
        raise StateFileError.at(
            "plan.round", f"round {plan.round} is outside 1..{rounds} (the spec's rounds)", source)
    for i, entry in enumerate(plan.entries):
        if entry.status not in PLAN_STATUSES:
            raise StateFileError.at(f"plan.entries[{i}].status",
                                    f"unknown status {entry.status!r}", source)
        if entry.rule is not None and not (_is_int(entry.rule) and 0 <= entry.rule < rules):
            raise StateFileError.at(f"plan.entries[{i}].rule",
                                    f"no rule {entry.rule!r} in the spec ({rules} rules)", source)
    last = 1
    for k, step in enumerate(plan.steps):
        for rnd, _name in step:
            if not last <= rnd <= rounds:
                raise StateFileError.at(
                    f"plan.steps[{k}]", f"a step of round {rnd} after round {last} or outside "
                    f"1..{rounds} (the spec's rounds)", source)
            last = rnd
    for k, (rnd, _name, rule) in enumerate(plan.later):
        if not (plan.round < rnd <= rounds and 0 <= rule < rules):
            raise StateFileError.at(f"plan.later[{k}]", f"round {rnd} or rule {rule} does not "
                                    f"fit the plan's round {plan.round} and the spec", source)
    return plan


def check_state(state: Mapping[str, Any], spec: Spec, model: nn.Module,
                source: str | None = None) -> Plan:
    """Check a state's plain data against its spec and ``model`` (the original architecture).

    The plan (its round within the spec's rounds, its rule indices), ``position`` (within
    the plan's steps, one per step report), the reports' count and each manifest entry's
    name (a layer of ``model`` compressed in a done step of the entry's round), round and
    rule. Decomposition, rank and parameters are checked by :func:`rebuild`. Each problem
    is a :class:`StateFileError` naming the field. Returns the plan.
    """
    plan = read_plan(state, spec, source)
    position = state["position"]
    if not _is_int(position):
        raise StateFileError.at("position", f"position must be an int, got {position!r}",
                                source)
    steps = len(plan.steps)
    if not 0 <= position <= steps:
        raise StateFileError.at(
            "position", f"position {position} is outside 0..{steps} (the plan has {steps} "
            "steps)", source)
    for k, step in enumerate(plan.steps[:position]):
        if step and step[-1][0] > plan.round:
            raise StateFileError.at(
                "position", f"position {position} counts step {k} of round {step[-1][0]} as "
                f"done, but the plan is in round {plan.round}", source)
    if "reports" in state:  # one report per step done (and one for a final empty step)
        reports = state["reports"]
        if not isinstance(reports, list):
            raise StateFileError.at("reports", "the reports must be a list, got "
                                    f"{_kind(reports)}", source)
        finished = position == steps and plan.round == spec.rounds
        if not (len(reports) == position or (finished and len(reports) == position + 1)):
            raise StateFileError.at(
                "position", f"position {position} does not match the {len(reports)} step "
                "report(s)", source)
    manifest = state["manifest"]
    if not isinstance(manifest, list):
        raise StateFileError.at(
            "manifest", f"the manifest must be a list of entries, got {_kind(manifest)}", source)
    done = {item for step in plan.steps[:position] for item in step}
    seen: set[tuple[int, str]] = set()
    for i, entry in enumerate(manifest):
        field = f"manifest[{i}]"
        name = _entry_name(entry, i, model, source)
        for key in ("round", "rule"):
            if key not in entry:
                raise StateFileError.at(f"{field}.{key}", "missing", source)
            if not _is_int(entry[key]):
                raise StateFileError.at(f"{field}.{key}",
                                        f"{key} must be an int, got {entry[key]!r}", source)
        rnd, rule = entry["round"], entry["rule"]
        if not 1 <= rnd <= plan.round:
            raise StateFileError.at(f"{field}.round", f"round {rnd} is outside 1..{plan.round} "
                                    "(the plan's round)", source)
        if not 0 <= rule < len(spec.rules):
            raise StateFileError.at(f"{field}.rule",
                                    f"no rule {rule} in the spec ({len(spec.rules)} rules)",
                                    source)
        if (rnd, name) not in done:
            raise StateFileError.at(f"{field}.name", f"layer {name!r} is not a layer of the "
                                    f"plan's done steps in round {rnd}", source)
        if (rnd, name) in seen:
            raise StateFileError.at(f"{field}.name",
                                    f"layer {name!r} is listed twice for round {rnd}", source)
        seen.add((rnd, name))
    return plan


PLAN_STATUSES = ("compress", "excluded", "unmatched", "skipped")


def _kind(value: Any) -> str:
    return type(value).__name__


def _entry_name(entry: Any, i: int, model: nn.Module, source: str | None) -> str:
    """The layer name of manifest entry ``i``, checked to be a layer of ``model``."""
    if not isinstance(entry, Mapping):
        raise StateFileError.at(f"manifest[{i}]",
                                f"an entry must be a mapping, got {_kind(entry)}", source)
    if "name" not in entry:
        raise StateFileError.at(f"manifest[{i}].name", "missing", source)
    name = entry["name"]
    if not isinstance(name, str) or not name:
        raise StateFileError.at(f"manifest[{i}].name",
                                f"name must be a layer name, got {name!r}", source)
    try:
        model.get_submodule(name)
    except AttributeError:
        raise StateFileError.at(
            f"manifest[{i}].name", f"layer {name!r} does not exist in the given model; pass a "
            "fresh instance of the original architecture", source) from None
    return name


def rebuild(model: nn.Module, manifest: list[Mapping[str, Any]],
            registry: Registry | None = None, *, source: str | None = None) -> nn.Module:
    """Apply a manifest's replacements to ``model`` in order; mutates ``model``.

    Each entry names a layer, the decomposition that replaced it, its rank and
    parameters; the decomposition's :meth:`~musco_core.Decomposition.skeleton`
    builds a module of the right structure (weights are loaded afterwards). An
    entry that does not fit (a layer the model lacks, a decomposition that is not
    registered or does not handle the layer, a rank invalid for it, parameters that
    are not the decomposition's) is a :class:`StateFileError` naming the field
    (``manifest[0].rank``); entries before it have been applied.
    """
    registry = registry or default_registry()
    if not isinstance(manifest, list):
        raise StateFileError.at(
            "manifest", f"the manifest must be a list of entries, got {_kind(manifest)}", source)
    for i, entry in enumerate(manifest):
        field = f"manifest[{i}]"
        name = _entry_name(entry, i, model, source)
        module = model.get_submodule(name)
        for key in ("decomposition", "rank"):
            if key not in entry:
                raise StateFileError.at(f"{field}.{key}", "missing", source)
        decomposition = entry["decomposition"]
        if not isinstance(decomposition, str):
            raise StateFileError.at(f"{field}.decomposition", "decomposition must be a "
                                    f"decomposition name, got {decomposition!r}", source)
        try:
            strategy = registry.get("decompositions", decomposition).strategy
        except KeyError as exc:
            raise StateFileError.at(
                f"{field}.decomposition", f"{decomposition!r} is not a registered "
                f"decomposition ({exc.args[0] if exc.args else exc}); install the plugin that "
                "provides it", source) from None
        try:
            strategy.check(name, module)
        except Exception as exc:  # noqa: BLE001 - UnsupportedLayerError, or a plugin's own
            message = str(exc) if isinstance(exc, UnsupportedLayerError) else (
                f"decomposition {decomposition!r} cannot check layer {name!r} "
                f"({type(exc).__name__}: {exc})")
            raise StateFileError.at(f"{field}.decomposition", message, source) from None
        params = entry.get("params", {})
        if not isinstance(params, Mapping):
            raise StateFileError.at(f"{field}.params", "the parameters must be a mapping, got "
                                    f"{_kind(params)}", source)
        try:
            params = structure_params(params, strategy.Params)
        except Exception as exc:  # noqa: BLE001 - cattrs and the Params' own validators
            problems = "; ".join(format_params_error(exc, "$"))
            raise StateFileError.at(
                f"{field}.params", f"parameters {dict(params)!r} do not fit decomposition "
                f"{decomposition!r}: {problems}", source) from None
        rank = entry["rank"]
        if not _is_rank(rank):
            raise StateFileError.at(f"{field}.rank",
                                    f"rank {rank!r} is not an int or a list of ints", source)
        rank = tuple(rank) if isinstance(rank, list) else rank
        try:
            message = strategy.validate_rank(module, rank)
        except Exception as exc:  # noqa: BLE001 - a plugin's check failing on this input
            message = f"rank {rank!r} could not be checked ({type(exc).__name__}: {exc})"
        if message:
            raise StateFileError.at(f"{field}.rank", f"layer {name!r}: {message} for "
                                    f"decomposition {decomposition!r}", source)
        try:
            new = strategy.skeleton(module, rank, params)
        except Exception as exc:
            raise StateFileError.at(
                field, f"could not rebuild layer {name!r} with {decomposition!r} at rank "
                f"{rank!r}: {type(exc).__name__}: {exc}", source) from exc
        replace_module(model, name, new)
    return model


def load_state_into(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(weights)`` with an error naming what does not fit."""
    if not isinstance(weights, Mapping):
        raise StateFileError.at("model", f"the weights must be a mapping of names to tensors, "
                                f"got {_kind(weights)}", source)
    bad = next((k for k, v in weights.items()
                if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise StateFileError.at("model", f"weight {bad!r} is not a tensor, got "
                                f"{_kind(weights[bad])}", source)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k}: expected {tuple(own[k].shape)}, got "
                         f"{tuple(weights[k].shape)}")
        raise StateFileError.at("model", f"the weights in {source} do not fit the model: "
                                + "; ".join(parts))
    model.load_state_dict(weights)


def load_compressed(model: nn.Module, path: str | Path, *,
                    registry: Registry | None = None) -> nn.Module:
    """Rebuild a compressed model from a state file on a fresh original model.

    ``model`` is a new instance of the original (uncompressed) architecture, e.g.
    ``model_factory()``; it is not modified. Returns a compressed copy with the
    saved structure and weights, on ``model``'s device. No classes are unpickled.
    """
    state = read_state(path)
    source = str(path)
    check_state(state, read_spec(state, source), model, source)
    work = copy.deepcopy(model)
    rebuild(work, state["manifest"], registry, source=source)
    load_state_into(work, state["model"], source)
    return work
