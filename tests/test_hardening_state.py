"""Issue 19, item 2: every corrupted or edited state file is a StateFileError naming the field.

Byte flips: every single-byte flip of a small state file, read by ``load_compressed``
and by ``Compressor.resume``, gives a StateFileError or (a flip in bytes nothing
reads, e.g. zip padding) exactly the original. Edits: a file re-saved with one
plain-data field changed (so every checksum still holds) is refused with the field.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core import RankRule, Rule, Spec, StateFileError
from musco_core.persist import atomic_save, read_state

SPEC = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=1))],
            layers_per_step=1, rounds=2)
X = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))


def fresh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run after its first step, saved; and the compressor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = musco.Compressor(fresh(), SPEC, X)
        c.step()
    path = tmp_path_factory.mktemp("state") / "run.musco"
    c.save(path)
    return path, c


def _same_state(a, b) -> bool:
    """Equal plain data and equal tensors (a state dict, or the ``model`` part of one)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _read_both(path) -> list:
    """What each reader makes of ``path``: a StateFileError, another exception, or the state."""
    out = []
    for read in ("load_compressed", "resume"):
        try:
            if read == "load_compressed":
                out.append(musco.load_compressed(fresh(), path).state_dict())
            else:
                out.append(musco.Compressor.resume(path, fresh(), example_inputs=X).state_dict())
        except StateFileError as exc:
            out.append(exc)
        except BaseException as exc:  # noqa: BLE001 - what the test is looking for
            out.append(RuntimeError(f"{read}: {type(exc).__name__}: {exc}"))
    return out


def test_every_single_byte_flip_is_a_state_file_error_or_the_original(saved, tmp_path):
    """All flips of the file through ``read_state`` (the one reader of the file both
    ``load_compressed`` and ``resume`` use), then through both readers end to end:
    every flip that read_state passes with changed contents, and a sample of the rest."""
    path, c = saved
    raw = path.read_bytes()
    assert len(raw) < 6000  # keeps this test to a few seconds
    original = read_state(path)
    flipped = tmp_path / "flipped.musco"
    flipped.write_bytes(raw)
    refused, same, changed = [], [], []
    others: dict[str, list[int]] = {}
    with warnings.catch_warnings(), open(flipped, "r+b") as f:
        warnings.simplefilter("ignore")  # torch warns about odd pickle protocols
        for i in range(len(raw)):
            f.seek(i)
            f.write(bytes([raw[i] ^ 0xFF]))
            f.flush()
            try:
                state = read_state(flipped)
            except StateFileError:
                refused.append(i)
            except BaseException as exc:  # noqa: BLE001 - what the test is looking for
                others.setdefault(f"{type(exc).__name__}: {exc}"[:120], []).append(i)
            else:
                (same if _same_state(state, original) else changed).append(i)
            f.seek(i)
            f.write(raw[i:i + 1])
            f.flush()
    assert not others, {k: v[:5] for k, v in others.items()}
    assert len(refused) > len(same) > 0

    expected = [c.model.state_dict(), c.state_dict()]
    sample = changed + same[::max(1, len(same) // 15)] + refused[::max(1, len(refused) // 30)]
    wrong = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in sample:
            data = bytearray(raw)
            data[i] ^= 0xFF
            flipped.write_bytes(bytes(data))
            for got, want in zip(_read_both(flipped), expected):
                if isinstance(got, StateFileError):
                    continue
                if isinstance(got, BaseException) or i in refused or not _same_state(got, want):
                    wrong[i] = repr(got)[:200]
    assert not wrong, wrong


# -- edited files: every checksum holds, the plain data is wrong -------------------------


def _edited(saved, tmp_path, edit) -> object:
    _, c = saved
    state = copy.deepcopy(c.state_dict())
    edit(state)
    path = tmp_path / "edited.musco"
    atomic_save(state, path)
    return path


def _set(path: tuple, value):
    def edit(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _delete(path: tuple):
    def edit(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return edit


BOTH = ("load_compressed", "resume")
RESUME = ("resume",)

EDITS = [
    # (edit, field the error must name, readers that must refuse it, message pattern)
    (_set(("position",), -1), "position", BOTH, r"position -1 is outside 0\.\.\d+"),
    (_set(("position",), 99), "position", BOTH, r"position 99 is outside 0\.\.\d+"),
    (_set(("position",), "1"), "position", BOTH, r"position must be an int, got '1'"),
    (_set(("position",), True), "position", BOTH, r"position must be an int, got True"),
    (_set(("position",), 0), "position", BOTH, r"steps? report"),
    (_set(("plan", "round"), 0), "plan.round", BOTH, r"round 0 is outside 1\.\.2"),
    (_set(("plan", "round"), 7), "plan.round", BOTH, r"round 7 is outside 1\.\.2"),
    (_set(("plan", "steps"), "x"), "plan", BOTH, r""),
    (_set(("plan", "entries", 0, "rule"), 5), "plan.entries[0].rule", BOTH, r"no rule 5"),
    (_set(("plan",), None), "plan", BOTH, r""),
    (_set(("manifest", 0, "decomposition"), "cp3"), "manifest[0].decomposition", BOTH,
     r"'cp3'.*does not support SVDLinear|'cp3'.*does not support Linear"),
    (_set(("manifest", 0, "decomposition"), "no_such"), "manifest[0].decomposition", BOTH,
     r"'no_such' is not a registered decomposition"),
    (_set(("manifest", 0, "decomposition"), 3), "manifest[0].decomposition", BOTH,
     r"must be a decomposition name"),
    (_set(("manifest", 0, "rank"), 0), "manifest[0].rank", BOTH, r"rank 0 is outside 1\.\.4"),
    (_set(("manifest", 0, "rank"), 99), "manifest[0].rank", BOTH, r"rank 99 is outside"),
    (_set(("manifest", 0, "rank"), [1, 1]), "manifest[0].rank", BOTH, r"is not an int"),
    (_set(("manifest", 0, "rank"), "1"), "manifest[0].rank", BOTH, r"is not an int"),
    (_set(("manifest", 0, "rank"), 2), "model", BOTH, r"do not fit the model"),
    (_set(("manifest", 0, "params"), {"whiten": "yes"}), "manifest[0].params", BOTH, r"whiten"),
    (_set(("manifest", 0, "params"), {"bogus": 1}), "manifest[0].params", BOTH, r"bogus"),
    (_set(("manifest", 0, "params"), [1]), "manifest[0].params", BOTH, r"mapping"),
    (_set(("manifest", 0, "name"), "9"), "manifest[0].name", BOTH, r"'9' does not exist"),
    (_set(("manifest", 0, "name"), "2"), "manifest[0].name", BOTH,
     r"layer '2' is not .* done steps"),
    (_set(("manifest", 0, "name"), 0), "manifest[0].name", BOTH, r"must be a layer name"),
    (_set(("manifest", 0, "round"), 2), "manifest[0].round", BOTH, r"round 2"),
    (_set(("manifest", 0, "round"), "1"), "manifest[0].round", BOTH, r"must be an int"),
    (_set(("manifest", 0, "rule"), 3), "manifest[0].rule", BOTH, r"no rule 3"),
    (_delete(("manifest", 0, "rank")), "manifest[0].rank", BOTH, r"missing"),
    (_set(("manifest", 0), "x"), "manifest[0]", BOTH, r"must be a mapping"),
    (_set(("manifest",), {"a": 1}), "manifest", BOTH, r"must be a list"),
    (_set(("manifest",), []), "model", BOTH, r"do not fit the model"),
    (_set(("model", "0.first.weight"), "x"), "model", BOTH, r"not a tensor"),
    (_set(("model",), [1]), "model", BOTH, r"must be a mapping"),
    (_set(("spec", "rounds"), 0), "spec", BOTH, r"'rounds' must be >= 1.* @ \$\.rounds"),
    (_set(("spec", "rules"), []), "spec", BOTH, r"at least one rule"),
    (_set(("spec",), "x"), "spec", BOTH, r"a spec must be a mapping"),
    (_set(("stats",), {"0": {"input_shape": "x"}}), "stats['0']", RESUME, r""),
    (_set(("stats",), [1]), "stats", RESUME, r"must be a mapping"),
    (_set(("reports", 0), {"step": 0}), "reports[0]", RESUME, r""),
    (_set(("reports",), "x"), "reports", RESUME, r"must be a list"),
    (_set(("model_flops_now",), "x"), "model_flops_now", RESUME, r"must be an int"),
    (_set(("model_params_before",), -5), "model_params_before", RESUME, r"must be an int >= 0"),
    (_set(("joint_ranks",), {"x": {}}), "joint_ranks", RESUME, r""),
    (_set(("joint_ranks",), {"9": {}}), "joint_ranks", RESUME, r"no rule 9"),
    (_set(("joint_tables",), {"0": 5}), "joint_tables", RESUME, r""),
]


@pytest.mark.parametrize("edit, field, readers, message", EDITS,
                         ids=[f"{e[1]}-{i}" for i, e in enumerate(EDITS)])
def test_an_edited_state_file_is_refused_naming_the_field(saved, tmp_path, edit, field,
                                                          readers, message):
    path = _edited(saved, tmp_path, edit)
    for read in readers:
        with pytest.raises(StateFileError, match=message) as excinfo:
            if read == "load_compressed":
                musco.load_compressed(fresh(), path)
            else:
                musco.Compressor.resume(path, fresh(), example_inputs=X)
        assert excinfo.value.field == field, (read, str(excinfo.value))
        assert str(excinfo.value).endswith(f"@ {field}"), (read, str(excinfo.value))
        assert str(path) in str(excinfo.value)


def test_an_edited_state_dict_is_refused_by_from_state(saved):
    _, c = saved
    state = c.state_dict()
    state["position"] = -1
    with pytest.raises(StateFileError, match=r"^the state: position -1 is outside .* @ position$"):
        musco.Compressor.from_state(state, fresh(), example_inputs=X)
    with pytest.raises(StateFileError, match=r"must be a mapping"):
        musco.Compressor.from_state([1, 2], fresh(), example_inputs=X)
    state = c.state_dict()
    del state["stats"]
    with pytest.raises(StateFileError, match=r"missing @ stats$"):
        musco.Compressor.from_state(state, fresh(), example_inputs=X)


def test_rebuild_names_the_manifest_field():
    from musco_core.persist import rebuild

    model = fresh()
    with pytest.raises(StateFileError) as excinfo:
        rebuild(model, [{"name": "0", "round": 1, "rule": 0, "decomposition": "cp3", "rank": 1,
                         "params": {}}])
    assert excinfo.value.field == "manifest[0].decomposition"
    assert type(model[0]) is nn.Linear  # nothing replaced


def test_an_unedited_file_still_loads_and_resumes(saved):
    path, c = saved
    model = musco.load_compressed(fresh(), path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 c.model.state_dict().values()))
    again = musco.Compressor.resume(path, fresh(), example_inputs=X)
    assert _same_state(again.state_dict(), c.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while not again.done:
            again.step()
    assert again.done and [(e["name"], e["round"]) for e in again.manifest][:2] == [
        ("0", 1), ("2", 1)]
