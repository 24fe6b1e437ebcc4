"""Run by tests/test_lightning.py: the callback under Lightning's DDP, 2 CPU processes (gloo).

Usage: python lightning_ddp_run.py OUTDIR. Lightning starts the second rank by running this
script again; each rank writes OUTDIR/rank{r}.pt with its manifest and final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from test_lightning import LitNet, callback, loader


class AfterLastStep(pl.Callback):
    """Remembers the weights right after the last compression step."""

    def __init__(self, compression):
        self.compression = compression
        self.snapshot = None

    def on_train_epoch_start(self, trainer, pl_module):
        if self.snapshot is None and self.compression.compressor.done:
            self.snapshot = {k: v.clone() for k, v in pl_module.state_dict().items()}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    compression = callback()
    after = AfterLastStep(compression)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", devices=2, strategy="ddp",
                         callbacks=[compression, after], logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=out, deterministic=True)
    lit = LitNet()
    trainer.fit(lit, loader())
    state = lit.state_dict()
    changed = any(not torch.equal(after.snapshot[k], v) for k, v in state.items()
                  if k.startswith("net.fc2."))
    torch.save({"manifest": compression.compressor.manifest, "model": state,
                "trained_after_last_step": changed},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
