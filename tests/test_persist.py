"""Saving, resuming and reloading: bit-for-bit resumption, atomic writes, clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core import RankRule, Rule, Spec, StateFileError
from musco_std.svd import SVDLinear

from conftest import TinyResNet

SPEC = Spec(rules=[Rule(match=["linear", "conv1x1"], decomposition="svd",
                        rank=RankRule("param_reduction", rate=1.5))],
            layers_per_step=2, rounds=2)


def fresh() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet()


def fine_tune(model: nn.Module, step: int) -> None:
    """A deterministic stand-in for training: a few SGD steps on fixed data."""
    g = torch.Generator().manual_seed(100 + step)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def run_uninterrupted() -> musco.Compressor:
    c = musco.Compressor(fresh(), SPEC, torch.randn(2, 3, 16, 16))
    while not c.done:
        fine_tune(c.model, c.position)
        c.step()
    return c


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_resumed_run_is_bit_identical(tmp_path, kill_after):
    reference = run_uninterrupted()
    path = tmp_path / "run.musco"
    c = musco.Compressor(fresh(), SPEC, torch.randn(2, 3, 16, 16))
    for _ in range(kill_after + 1):
        fine_tune(c.model, c.position)
        c.step()
        c.save(path)
    del c  # the process dies here
    c = musco.Compressor.resume(path, fresh())
    assert c.position == kill_after + 1
    while not c.done:
        fine_tune(c.model, c.position)
        c.step()
    assert same(c.model.state_dict(), reference.model.state_dict())
    assert c.manifest == reference.manifest
    def summary(reports):
        return [(x.name, x.round, x.rank, x.params_after, x.rel_error)
                for r in reports for x in r.layers]

    assert summary(c.reports) == summary(reference.reports)


def test_load_compressed_rebuilds_structure_without_pickled_classes(tmp_path):
    c = run_uninterrupted()
    path = tmp_path / "model.musco"
    c.save(path)
    torch.load(path, weights_only=True)  # plain data and tensors only
    original = fresh()
    loaded = musco.load_compressed(original, path)
    assert isinstance(loaded.fc, SVDLinear) and isinstance(original.fc, nn.Linear)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(loaded.eval()(x), c.model.eval()(x))
    assert [e["round"] for e in c.manifest] == [1, 1, 1, 2, 2, 2]


def test_writes_are_atomic(tmp_path, monkeypatch):
    c = musco.Compressor(fresh(), SPEC, torch.randn(2, 3, 16, 16))
    path = tmp_path / "run.musco"
    c.save(path)
    good = path.read_bytes()
    c.step()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        c.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["run.musco"]


def test_corrupt_and_foreign_files_are_rejected(tmp_path):
    bad = tmp_path / "bad.musco"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(StateFileError, match="not a readable musco state file"):
        musco.Compressor.resume(bad, fresh())
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(StateFileError, match="not a musco state file"):
        musco.load_compressed(fresh(), foreign)
    with pytest.raises(StateFileError, match="no musco state file at"):
        musco.load_compressed(fresh(), tmp_path / "missing.musco")


def test_a_file_that_does_not_fit_the_model_names_the_layer(tmp_path):
    c = musco.Compressor(fresh(), SPEC, torch.randn(2, 3, 16, 16))
    c.step()
    c.save(tmp_path / "run.musco")
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(StateFileError, match="layer 'layer2.shortcut.0' does not exist"):
        musco.load_compressed(other, tmp_path / "run.musco")
    wider = TinyResNet(width=16)
    with pytest.raises(StateFileError, match="do not fit the model"):
        musco.load_compressed(wider, tmp_path / "run.musco")


def _record_span(path, name_suffix: str | None = None):
    """(start, size) of the data of the largest zip record (or the one ending in name_suffix)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        storages = [i for i in infos if re.search(r"/data/\d+$", i.filename)]
        info = (next(i for i in infos if i.filename.endswith(name_suffix)) if name_suffix
                else max(storages, key=lambda i: i.file_size))
    raw = path.read_bytes()
    # local header: 30 bytes + name + extra (the local extra field may differ from the central one)
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip(path, start: int, count: int = 16) -> None:
    raw = bytearray(path.read_bytes())
    raw[start:start + count] = bytes(b ^ 0xFF for b in raw[start:start + count])
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_tensor_are_detected_and_named(tmp_path):
    c = musco.Compressor(fresh(), SPEC, torch.randn(2, 3, 16, 16))
    c.step()
    path = tmp_path / "run.musco"
    c.save(path)
    start, size = _record_span(path)
    _flip(path, start + size // 2)
    with pytest.raises(StateFileError, match=r"run\.musco is corrupt: tensor 'model\.[\w.]+' "
                                             r"does not match its checksum"):
        musco.load_compressed(fresh(), path)
    with pytest.raises(StateFileError, match="does not match its checksum"):
        musco.Compressor.resume(path, fresh())


def test_damage_outside_the_tensors_is_detected(tmp_path):
    c = musco.Compressor(fresh(), SPEC, torch.randn(2, 3, 16, 16))
    path = tmp_path / "run.musco"
    c.save(path)
    start, size = _record_span(path, "data.pkl")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"layers_per_step", start, start + size) + len(b"layers_per_step")
    raw[at + 1] ^= 0x01  # one bit of the pickle: the value or the opcode after the key
    path.write_bytes(bytes(raw))
    with pytest.raises(StateFileError, match=r"run\.musco (is corrupt|is not a readable)"):
        musco.load_compressed(fresh(), path)


def test_files_without_checksums_still_load(tmp_path):
    c = musco.Compressor(fresh(), SPEC, torch.randn(2, 3, 16, 16))
    c.step()
    path = tmp_path / "old.musco"
    torch.save(c.state_dict(), path)  # as written before checksums existed
    model = musco.load_compressed(fresh(), path)
    assert same(model.state_dict(), c.model.state_dict())


def test_state_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    c = musco.Compressor(fresh(), SPEC, torch.randn(2, 3, 16, 16))
    path = tmp_path / "run.musco"
    old = os.umask(0o022)
    try:
        c.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o600)  # a file the user restricted stays restricted
        c.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)
