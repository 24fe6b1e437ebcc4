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

from musco_core.errors import MuscoError
from musco_core.registry import Registry, default_registry
from musco_core.spec import structure_params
from musco_core.surgery import replace_module

FORMAT = "musco-state"
VERSION = 1


class StateFileError(MuscoError, ValueError):
    """A file is not a musco state file, is corrupt, or does not fit the model."""


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
    except Exception as exc:
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
        found = dict(_tensors({k: v for k, v in state.items() if k != CHECKSUMS}))
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
    except (OSError, zipfile.BadZipFile, zlib.error, RuntimeError) as exc:
        raise StateFileError(f"{path} is corrupt: {exc}") from None
    if bad is not None:
        raise StateFileError(
            f"{path} is corrupt: record {bad!r} does not match its CRC; the file was damaged "
            "or changed after it was written"
        )


def rebuild(model: nn.Module, manifest: list[Mapping[str, Any]],
            registry: Registry | None = None) -> nn.Module:
    """Apply a manifest's replacements to ``model`` in order; mutates ``model``.

    Each entry names a layer, the decomposition that replaced it, its rank and
    parameters; the decomposition's :meth:`~musco_core.Decomposition.skeleton`
    builds a module of the right structure (weights are loaded afterwards).
    """
    registry = registry or default_registry()
    for i, entry in enumerate(manifest):
        name = entry["name"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise StateFileError(
                f"manifest entry {i}: layer {name!r} does not exist in the given model; "
                "pass a fresh instance of the original architecture"
            ) from None
        try:
            strategy = registry.get("decompositions", entry["decomposition"]).strategy
        except KeyError as exc:
            raise StateFileError(
                f"manifest entry {i} (layer {name!r}) needs {exc.args[0]}; install the plugin "
                "that provides it"
            ) from None
        rank = entry["rank"]
        rank = tuple(rank) if isinstance(rank, list) else rank
        params = structure_params(entry.get("params", {}), strategy.Params)
        try:
            strategy.check(name, module)
            new = strategy.skeleton(module, rank, params)
        except Exception as exc:
            raise StateFileError(
                f"manifest entry {i}: could not rebuild layer {name!r} with "
                f"{entry['decomposition']!r} at rank {rank!r}: {exc}"
            ) from exc
        replace_module(model, name, new)
    return model


def load_state_into(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(weights)`` with an error naming what does not fit."""
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
        raise StateFileError(f"the weights in {source} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(weights)


def load_compressed(model: nn.Module, path: str | Path, *,
                    registry: Registry | None = None) -> nn.Module:
    """Rebuild a compressed model from a state file on a fresh original model.

    ``model`` is a new instance of the original (uncompressed) architecture, e.g.
    ``model_factory()``; it is not modified. Returns a compressed copy with the
    saved structure and weights, on ``model``'s device. No classes are unpickled.
    """
    state = read_state(path)
    work = copy.deepcopy(model)
    rebuild(work, state["manifest"], registry)
    load_state_into(work, state["model"], str(path))
    return work
