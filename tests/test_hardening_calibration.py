"""Issue 19, item 5: calibration problems are musco errors (``CalibrationError``).

Bad calibration arguments (an empty list, a generator, a single tensor, a path ...) and
a data source that raises midway (a DataLoader worker error) are ``CalibrationError``
(a ``MuscoError``; also a ``ValueError`` and a ``TypeError``, the types raised before),
naming what was given or the step and batch; the data source's own exception is chained
and the model is left as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import musco_core as musco
from musco_core import Decompose, RankRule, Rule, Spec

X = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
WHITENED = Spec(rules=[Rule(match="linear", decomposition=Decompose("svd", whiten=True),
                            rank=RankRule("fixed", rank=3))], layers_per_step=2)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 12, generator=g) for _ in range(n)]


# -- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("given, named, hint", [
    ([], "empty", "at least one batch"),
    ((), "empty", "at least one batch"),
    (iter(batches()), "list_iterator", "pass list"),
    ((b for b in batches()), "generator", "pass list"),
    (X, "single Tensor", "wrap it in a list"),
    ({"input": X}, "single dict", "wrap it in a list"),
    (5, "got int", "DataLoader"),
    ("calibration.pt", "got a str", "DataLoader"),
    (b"\x00\x01", "got a bytes", "DataLoader"),
])
def test_a_bad_calibration_argument_is_a_calibration_error(given, named, hint):
    with pytest.raises(musco.MuscoError) as excinfo:
        musco.Compressor(model(), WHITENED, X, calibration=given)
    error = excinfo.value
    assert isinstance(error, musco.CalibrationError)
    assert isinstance(error, ValueError) and isinstance(error, TypeError)  # as before
    assert named in str(error) and hint in str(error)
    assert error.step is None and error.batch is None


def test_calibration_error_is_exported():
    from musco_core.errors import CalibrationError

    assert musco.CalibrationError is CalibrationError and "CalibrationError" in musco.__all__
    assert issubclass(CalibrationError, musco.MuscoError)


# -- a data source that raises midway ------------------------------------------------------


class Flaky:
    """Re-iterable batches; once armed, raises ``error`` reading batch ``at`` of pass ``on``."""

    def __init__(self, data, at: int, error: Exception, on: int = 1):
        self.data, self.at, self.error, self.on = data, at, error, on
        self.armed = False
        self.passes = 0

    def __iter__(self):
        if self.armed:
            self.passes += 1
        for i, batch in enumerate(self.data):
            if self.armed and self.passes == self.on and i == self.at:
                raise self.error
            yield batch


def _snapshot(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m: nn.Module, before: dict) -> bool:
    now = m.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


@pytest.mark.parametrize("spec, on", [
    (WHITENED, 1),                                                      # the statistics pass
    (WHITENED, 2),                                                      # the output-error pass
    (Spec(rules=[Rule(match="linear", decomposition="svd",              # a joint rule's damage
                      rank=RankRule("budget", flop_reduction=1.5, grid=3))]), 1),
])
def test_a_data_source_raising_in_a_step_is_a_calibration_error_and_changes_nothing(spec, on):
    original = model()
    error = OSError("DataLoader worker (pid 4242) exited unexpectedly")
    data = Flaky(batches(), at=2, error=error, on=on)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressor = musco.Compressor(original, spec, X, calibration=data, inplace=True)
    before = _snapshot(original)
    data.armed = True
    with pytest.raises(musco.CalibrationError) as excinfo:
        compressor.step()
    message = str(excinfo.value)
    assert "step 0" in message and "batch 2" in message, message
    assert "OSError: DataLoader worker (pid 4242) exited unexpectedly" in message
    assert excinfo.value.__cause__ is error
    assert excinfo.value.step == 0 and excinfo.value.batch == 2
    assert _unchanged(original, before) and all(type(m) is not nn.Module for m in original)
    assert compressor.position == 0 and compressor.manifest == [] and compressor.reports == []
    data.armed = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressor.step()  # the same step runs once the data reads again
    assert compressor.position == 1


class Samples(Dataset):
    def __init__(self):
        self.data = torch.cat(batches())
        self.broken = False

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if self.broken and i >= 8:
            raise RuntimeError(f"cannot read sample {i}")
        return self.data[i]


def test_a_dataloader_failing_midway_names_the_step_and_the_batch():
    dataset = Samples()
    loader = DataLoader(dataset, batch_size=4)
    compressor = musco.Compressor(model(), WHITENED, X, calibration=loader)
    dataset.broken = True
    with pytest.raises(musco.CalibrationError,
                       match=r"batch 2 .*step 0.*RuntimeError: cannot read sample 8"):
        compressor.step()
    assert compressor.position == 0


def test_a_data_source_failing_on_the_first_check_names_the_batch():
    data = Flaky(batches(), at=0, error=ValueError("bad shard"))
    data.armed = True
    with pytest.raises(musco.CalibrationError, match=r"batch 0.*ValueError: bad shard") as excinfo:
        musco.Compressor(model(), WHITENED, X, calibration=data)
    assert excinfo.value.step is None and excinfo.value.batch == 0
    assert isinstance(excinfo.value.__cause__, ValueError)


def test_an_interrupt_from_the_data_source_is_not_wrapped():
    data = Flaky(batches(), at=1, error=KeyboardInterrupt())
    compressor = musco.Compressor(model(), WHITENED, X, calibration=data)
    data.armed = True
    with pytest.raises(KeyboardInterrupt):
        compressor.step()
    assert compressor.position == 0
