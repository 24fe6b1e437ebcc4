"""The Fashion-MNIST CNN trained and compressed inside ``trainer.fit`` on 2 CPU processes vs 1.

    pip install 'musco[lightning]'
    python docs/benchmarks/lightning_ddp.py [--smoke] [--synthetic] [--data DIR] [--out DIR]
        [--train 6000] [--test 10000] [--configs 1x1,2x1,1x2]

Each configuration ``PxT`` (P processes of T threads) runs in a fresh Python process
(``strategy="ddp", accelerator="cpu", devices=2`` for P = 2, gloo; Lightning starts the
second rank by running this script again) with the same schedule: the small VGG CNN of
``_common.small_vgg`` is trained from scratch for ``--pretrain`` epochs, then
:class:`musco_core.lightning.CompressionCallback` compresses two layers at the start of each
of the next two epochs (Tucker-2 on ``conv2``-``conv4``, SVD on ``classifier.fc1``) and the
model is fine-tuned for ``--finetune`` more epochs. Every configuration sees the same
global batch (``--batch`` split across the processes) and the same number of optimizer
steps. Test accuracy is measured on rank 0 right before the first compression step and after
``fit``; every rank writes a hash of its final weights, so the table says whether the two
DDP ranks ended identical.

Results go to ``docs/benchmarks/results/lightning_ddp.{md,json}`` (``--out`` elsewhere).
``--smoke`` runs tiny sizes (synthetic data with ``--synthetic`` or when Fashion-MNIST is
missing) in well under a minute of CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "examples"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import _common as common  # noqa: E402

STEPS = 2  # four layers, two per step (the example's spec)

COLUMNS = ("processes", "threads/process", "global batch", "epochs", "acc before %",
           "acc after %", "params x", "FLOPs x", "compress s", "fit s", "wall s",
           "fit speedup", "ranks identical")


# -- one configuration (run in its own process; Lightning re-runs it for rank 1) -----------------


def _data(args):
    root = None if args.synthetic else common.fashion_mnist_dir(args.data)
    if root is None:
        if not args.synthetic:
            print(common.FASHION_HINT, file=sys.stderr)
        return common.synthetic_images(args.train, args.test), "synthetic stand-in"
    x, y, xt, yt = common.load_fashion_mnist(root)
    return (x[:args.train], y[:args.train], xt[:args.test], yt[:args.test]), "Fashion-MNIST"


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker(args) -> None:
    import lightning.pytorch as pl
    # The spec and LightningModule of docs/examples/lightning_fashion_mnist.py.
    from lightning_fashion_mnist import SPEC, LitCNN

    from musco_core.lightning import CompressionCallback

    torch.set_num_threads(args.threads)
    pl.seed_everything(0, workers=True, verbose=False)
    (x, y, xt, yt), source = _data(args)

    class BeforeCompression(pl.Callback):
        """Test accuracy on rank 0 at the start of the first compression epoch (listed first,
        so it runs before CompressionCallback in the same hook)."""

        accuracy = None

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == args.pretrain and trainer.is_global_zero:
                self.accuracy = common.accuracy(pl_module.net, xt, yt)

    per_process = args.batch // args.devices
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                        batch_size=per_process, shuffle=True)
    lit = LitCNN(lr=args.lr)
    before = BeforeCompression()
    compression = CompressionCallback(SPEC, example_inputs=x[:1], every_n_epochs=1,
                                      start=args.pretrain, module_attr="net")
    epochs = args.pretrain + STEPS + args.finetune
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto",
                         callbacks=[before, compression], logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0,
                         default_root_dir=args.workdir)
    start = time.perf_counter()
    trainer.fit(lit, train)
    fit_seconds = time.perf_counter() - start
    out = Path(args.workdir)
    rank = trainer.global_rank
    params = dict(lit.net.named_parameters())
    buffers = dict(lit.net.named_buffers())
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"parameters": _digest(params), "buffers": _digest(buffers),
         "manifest": compression.compressor.manifest}, default=str))
    if not trainer.is_global_zero:
        return
    run = compression.compressor.report()
    result = {
        "source": source, "processes": args.devices, "threads/process": args.threads,
        "global batch": per_process * args.devices, "epochs": epochs,
        "train images": len(x), "test images": len(xt),
        "acc before %": before.accuracy, "acc after %": common.accuracy(lit.net, xt, yt),
        "params before": run.model_params_before, "params after": run.model_params_after,
        "FLOPs before": run.model_flops_before, "FLOPs after": run.model_flops_after,
        "compress s": sum(step.seconds for step in run.steps), "fit s": fit_seconds,
        "done": compression.compressor.done,
    }
    (out / "result.json").write_text(json.dumps(result))


# -- the driver ---------------------------------------------------------------------------------


def _run_config(args, processes: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="musco_ddp_") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
               "--devices", str(processes), "--threads", str(threads), "--workdir", tmp,
               "--train", str(args.train), "--test", str(args.test), "--batch", str(args.batch),
               "--pretrain", str(args.pretrain), "--finetune", str(args.finetune),
               "--lr", str(args.lr)]
        cmd += ["--synthetic"] if args.synthetic else []
        cmd += ["--data", args.data] if args.data else []
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True,
                              timeout=args.timeout)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{processes}x{threads} failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(processes)]
    result["wall s"] = wall
    # Parameters and manifest must match; BatchNorm's running statistics may not: DDP
    # broadcasts rank 0's buffers at the start of each forward, so after the last batch each
    # rank holds the statistics of its own half of that batch.
    same = {json.dumps([r["parameters"], r["manifest"]], sort_keys=True) for r in ranks}
    result["ranks identical"] = "-" if processes == 1 else "yes" if len(same) == 1 else "NO"
    result["buffers identical"] = (processes == 1
                                   or len({r["buffers"] for r in ranks}) == 1)
    result["params x"] = result["params before"] / max(1, result["params after"])
    result["FLOPs x"] = result["FLOPs before"] / max(1, result["FLOPs after"])
    return result


def _configs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        processes, threads = (int(v) for v in item.strip().lower().split("x"))
        if processes not in (1, 2) or threads < 1:
            raise SystemExit(f"--configs: PxT with P in 1, 2 and T >= 1, got {item!r}")
        out.append((processes, threads))
    return out


def _notes(rows: list[dict], meta: dict) -> str:
    load = " / ".join(f"{v:.1f}" for v in meta["load_average"])
    cpus = meta["cpu_count"]
    text = f"""
Fashion-MNIST CNN (`_common.small_vgg`, 13.7 MFLOPs per image) trained from scratch and
compressed inside one `trainer.fit` by `musco_core.lightning.CompressionCallback`:
{meta['pretrain']} epochs of training, then one compression step at the start of each of the
next {STEPS} epochs (Tucker-2 at `param_reduction` 2 on `conv2`-`conv4`, SVD at 4 on
`classifier.fc1`, two layers per step), then {meta['finetune']} epoch(s) of fine-tuning;
AdamW lr {meta['lr']}, StepLR 0.7 per epoch; {meta['train']} training images
({meta['source']}), accuracy on {meta['test']} test images. `PxT` = P processes
(`strategy="ddp", accelerator="cpu"`, gloo) of T threads; the global batch and the number of
optimizer steps are the same in every row (DDP splits each batch across the ranks).
*acc before*: rank 0, right before the first compression step; *acc after*: after `fit`.
*compress s*: the compression steps (rank 0); *fit s*: `trainer.fit` on rank 0 (DDP: includes
starting the second process); *wall s*: the whole Python process, imports and data loading
included; *fit speedup*: the first row's *fit s* over the row's. *ranks identical*: both ranks
ended with the same parameters (SHA-256) and the same manifest (BatchNorm's running statistics
are the exception: DDP broadcasts rank 0's buffers at the start of each forward, so after the
last batch each rank holds those of its own half-batch).

**Read the times with care.** This machine has 2 CPU cores shared with other jobs, so two
processes of one thread each cannot beat one process by much, and they pay for the gradient
all-reduce, the second interpreter and Lightning's DDP set-up: these numbers do **not** show a
real DDP speedup, only that the callback works under DDP and what it costs here (load average
{load} at the end of this run, on {cpus} cores). One process of two threads can be the
slowest of all on a busy machine: its second intra-op thread waits for a core.

The accuracies differ between rows by a few tenths of a point: under DDP the data order
differs and BatchNorm sees half the batch on each rank (no `sync_batchnorm`), and two threads
add up in another order than one. Compression is not the cause: both ranks choose the same
ranks and end with the same parameters, and every row compresses to the same size.
"""
    return text


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--synthetic", action="store_true", help="synthetic images, no dataset")
    parser.add_argument("--data", default=None, help="directory of the Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--configs", default="1x1,2x1,1x2",
                        help="comma-separated PxT: P processes (1 or 2) of T threads")
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--pretrain", type=int, default=2)
    parser.add_argument("--finetune", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.smoke:
        args.train, args.test, args.batch = 256, 128, 32
        args.pretrain, args.finetune = 1, 0
        if common.fashion_mnist_dir(args.data) is None:
            args.synthetic = True
    rows = []
    for processes, threads in _configs(args.configs):
        row = _run_config(args, processes, threads)
        rows.append(row)
        print(f"{processes}x{threads}: acc {row['acc before %']:.2f} -> "
              f"{row['acc after %']:.2f} %, "
              f"fit {row['fit s']:.1f} s, wall {row['wall s']:.1f} s, "
              f"ranks identical: {row['ranks identical']}", flush=True)
    for row in rows:
        row["fit speedup"] = rows[0]["fit s"] / row["fit s"]
    meta = {"train": rows[0]["train images"], "test": rows[0]["test images"],
            "source": rows[0]["source"], "pretrain": args.pretrain, "finetune": args.finetune,
            "lr": args.lr, "batch": args.batch, "smoke": args.smoke,
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    print(common.text_table(rows, COLUMNS))
    common.write_results(Path(args.out), "lightning_ddp",
                         title="Lightning DDP on CPU: 2 processes vs 1 (Fashion-MNIST CNN)",
                         meta=meta, tables=[("rows", "Accuracy and wall time", rows, COLUMNS)],
                         notes=_notes(rows, meta))
    return {"rows": rows, "meta": meta}


if __name__ == "__main__":
    main()
