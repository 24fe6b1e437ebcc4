"""CompressionCallback: compression inside trainer.fit, checkpoints, resume, DDP on 2 CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="needs Lightning (pip install 'musco[lightning]')")

import musco_core as musco  # noqa: E402
from musco_core.lightning import CompressionCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::UserWarning:lightning_fabric",
    "ignore::DeprecationWarning")

SPEC = musco.Spec.from_toml("""
layers_per_step = 1
exclude = ["head", "conv1"]  # conv1 has 1 input channel: nothing to cut

[[rules]]
match = "conv_kxk"
decomposition = "tucker2"
rank = { name = "param_reduction", rate = 2.0 }

[[rules]]
match = "linear"
decomposition = "svd"
rank = { name = "param_reduction", rate = 2.0 }
""")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x))).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc(x)))))


class LitNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        return [optimizer], [scheduler]


def loader(n=64, batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                       batch_size=batch_size, shuffle=False)


def trainer(tmp_path, max_epochs, callback, **kwargs):
    return pl.Trainer(max_epochs=max_epochs, callbacks=[callback], accelerator="cpu",
                      devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      deterministic=True, **kwargs)


def callback(**kwargs):
    return CompressionCallback(SPEC, example_inputs=torch.randn(2, 1, 8, 8), every_n_epochs=1,
                               module_attr="net", **kwargs)


class Recorder(pl.loggers.Logger):
    """A logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_fit_compresses_every_step_and_rewires_the_optimizer(tmp_path):
    lit = LitNet()
    cb = callback()
    recorder = Recorder()
    t = trainer(tmp_path, 4, cb, enable_checkpointing=False)
    t.loggers = [recorder]
    t.fit(lit, loader())
    assert cb.compressor.done and cb.compressor.position == 3
    assert sorted(e["name"] for e in cb.compressor.manifest) == ["conv2", "fc", "fc2"]
    assert type(lit.net.conv2).__name__ == "Tucker2Conv2d"
    assert type(lit.net.fc).__name__ == "SVDLinear"
    (optimizer,) = t.optimizers
    assert not musco.stale_parameters(optimizer, lit)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.7 ** 4)  # schedule kept
    assert t.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    logged = [m for _, m in recorder.metrics if "musco/step" in m]
    assert [m["musco/step"] for m in logged] == [0.0, 1.0, 2.0]
    assert all(m["musco/params_after"] < m["musco/params_before"] for m in logged)


def test_resume_mid_compression_is_bit_identical(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1,
                                        filename="{epoch}")
    whole = LitNet()
    t = pl.Trainer(max_epochs=4, callbacks=[callback(), ckpt], accelerator="cpu", devices=1,
                   logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, deterministic=True)
    t.fit(whole, loader())
    # epoch=1.ckpt: two of three steps done, the third one due at the start of epoch 2
    resumed = LitNet()
    cb = callback()
    trainer(tmp_path / "b", 4, cb, enable_checkpointing=False).fit(
        resumed, loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert cb.compressor.done
    a, b = whole.state_dict(), resumed.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        CompressionCallback(SPEC, example_inputs=None)
    with pytest.raises(ValueError, match="int >= 1"):
        CompressionCallback(SPEC, example_inputs=None, every_n_steps=0)


DDP_SCRIPT = Path(__file__).with_name("lightning_ddp_run.py")


def test_ddp_two_cpu_processes_end_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(DDP_SCRIPT.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(DDP_SCRIPT), str(tmp_path)], check=True, env=env,
                   timeout=600, cwd=tmp_path)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0]["manifest"] == states[1]["manifest"] and len(states[0]["manifest"]) == 3
    a, b = states[0]["model"], states[1]["model"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the factors were trained after the last step, and DDP kept them in sync
    assert states[0]["trained_after_last_step"]


def test_example_lightning_fashion_mnist_smoke():
    import importlib.util

    path = Path(__file__).parents[1] / "docs" / "examples" / "lightning_fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("_example_lightning_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--limit", "256", "--batch-size", "128"])
    assert result["done"] and result["params_after"] < result["params_before"] / 2
    assert 0.0 <= result["val_acc"] <= 1.0
