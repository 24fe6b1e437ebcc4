"""Train and compress the small Fashion-MNIST CNN inside one ``trainer.fit`` with CompressionCallback.

    pip install 'musco[lightning]'
    python docs/examples/lightning_fashion_mnist.py [--data DIR] [--devices 2] [--limit 6000]

Epoch 0 trains the CNN from scratch; from epoch 1 on, every epoch starts with one compression
step (Tucker-2 on the 3x3 convs, SVD on the first Linear layer, two layers per step) and fine-tunes
the result. ``--devices 2`` runs Lightning's DDP on two CPU processes. Uses Fashion-MNIST when
found (see docs/benchmarks/_common.py), else a synthetic stand-in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))

import _common as common  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

import musco_core as musco  # noqa: E402
from musco_core.lightning import CompressionCallback  # noqa: E402

SPEC = musco.Spec.from_toml("""
layers_per_step = 2
exclude = ["features.conv1", "classifier.fc2"]   # 1 input channel; the 10-way head

[[rules]]
match = "conv_kxk"
decomposition = "tucker2"
rank = { name = "param_reduction", rate = 2.0 }

[[rules]]
match = "linear"
decomposition = "svd"
rank = { name = "param_reduction", rate = 4.0 }
""")


class LitCNN(pl.LightningModule):
    def __init__(self, lr: float = 2e-3):
        super().__init__()
        self.net = common.small_vgg()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)]


def data(args):
    root = common.fashion_mnist_dir(args.data)
    if root is not None:
        return common.load_fashion_mnist(root, limit=args.limit), "Fashion-MNIST"
    print(common.FASHION_HINT, file=sys.stderr)
    n = args.limit or 6000
    return common.synthetic_images(n, max(n // 6, 100)), "synthetic stand-in"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None)
    parser.add_argument("--limit", type=int, default=6000, help="images per split (0: all)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    args.limit = args.limit or None
    pl.seed_everything(0, workers=True)
    (x, y, xt, yt), source = data(args)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                        batch_size=args.batch_size, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=1000)

    lit = LitCNN()
    callback = CompressionCallback(SPEC, example_inputs=x[:1], every_n_epochs=1, start=1,
                                   module_attr="net")
    steps = 2                                          # 4 layers, 2 per step
    trainer = pl.Trainer(max_epochs=1 + steps + 1, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto",
                         callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.fit(lit, train, val)
    run = callback.compressor.report()
    result = {"source": source, "val_acc": float(trainer.callback_metrics["val_acc"]),
              "params_before": run.model_params_before, "params_after": run.model_params_after,
              "done": callback.compressor.done}
    if trainer.is_global_zero:
        print(run)
        print(result)
    return result


if __name__ == "__main__":
    main()
