"""Fashion-MNIST inverted-residual net: data-aware SVD of the 1x1 convs, without labels.

A small MobileNetV2-style network (``mobile_net``: a 3x3 stem, five inverted-residual
blocks — 1x1 expand, depthwise 3x3, 1x1 project, BatchNorm, ReLU6, residuals where the
shapes allow — a 1x1 head conv and a Linear classifier) is trained once (seeded, cached
under ``docs/benchmarks/.cache``) like the VGG CNN of ``cnn_fashion_mnist.py``. Its eleven
1x1 convs (88 % of its FLOPs) are then factorized by ``svd`` so that the **whole model**
needs 1.5x fewer FLOPs, without any fine-tuning, in these variants:

* ``plain``: weight-space truncated SVD, ``flop_reduction`` at one rate for every layer;
* ``plain + refine``: the same, then local refinement (``Spec.refine``) on the calibration
  images;
* ``whitened``: ``svd`` with ``whiten = true`` (truncation-aware whitening on the
  calibration inputs), every layer in one step;
* ``whitened, sequential``: the same one layer per step, so that each layer is fitted to
  the *original* output from the inputs it sees in the partly compressed model;
* ``whitened, sequential + refine``: plus local refinement toward each layer's original
  output (``Refine("layer_output")``);
* ``whitened, sequential + model refine``: plus local refinement toward the original
  *model's* output (``Refine("model_output")``);
* ``budget, ...``: the same two, with ranks by the ``budget`` rule (``flop_reduction = 1.5``
  with ``scope = "model"``: the whole model's FLOPs, allocated by measured damage) instead of
  one rate for all layers.

Calibration: ``--calib`` (512) *unlabeled* training images; local refinement gets
``--refine-seconds`` (120) of wall time in all, split evenly over the steps. Accuracy on
the 10k test images. Writes ``mobile.json`` and ``mobile.md`` to ``--out``.

    python docs/benchmarks/mobile_fashion_mnist.py              # full run, a few minutes
    python docs/benchmarks/mobile_fashion_mnist.py --smoke      # tiny, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import musco_core as musco  # noqa: E402

#: Model-level FLOP reduction asked of every variant.
TARGET = 1.5

#: name -> (whiten, layers_per_step (0: all in one step), refine scope ("" for none),
#: rank rule "uniform"/"budget")
VARIANTS = OrderedDict([
    ("plain", (False, 0, "", "uniform")),
    ("plain + refine", (False, 0, "layer", "uniform")),
    ("whitened", (True, 0, "", "uniform")),
    ("whitened, sequential", (True, 1, "", "uniform")),
    ("whitened, sequential + refine", (True, 1, "layer", "uniform")),
    ("whitened, sequential + model refine", (True, 1, "model", "uniform")),
    ("budget, whitened, sequential + refine", (True, 1, "layer", "budget")),
    ("budget, whitened, sequential + model refine", (True, 1, "model", "budget")),
])

COLUMNS = ["variant", "FLOPs", "FLOPs x", "params", "params x", "acc", "delta",
           "mean output error", "stats s", "refine s", "compress s"]


# -- the model ---------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, BN, ReLU6, depthwise 3x3, BN, ReLU6, 1x1 project, BN."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = nn.functional.relu6(self.bn1(self.expand(x)))
        out = nn.functional.relu6(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out))
        return x + out if self.residual else out


#: (in, out, stride, expansion) of the five blocks.
BLOCKS = [(16, 24, 2, 4), (24, 24, 1, 4), (24, 32, 2, 4), (32, 32, 1, 4), (32, 64, 1, 4)]


def mobile_net(num_classes: int = 10, width: int = 1) -> nn.Module:
    """The inverted-residual network for 1x28x28 images (9.6 MFLOPs per image at width 1)."""
    stem = nn.Sequential(nn.Conv2d(1, 16 * width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(16 * width), nn.ReLU6(inplace=True))
    blocks = nn.Sequential(*[InvertedResidual(a * width, b * width, s, t)
                             for a, b, s, t in BLOCKS])
    head = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(64 * width, 128 * width, 1, bias=False), bn=nn.BatchNorm2d(128 * width),
        relu=nn.ReLU6(inplace=True), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc=nn.Linear(128 * width, num_classes)))
    return nn.Sequential(OrderedDict(stem=stem, blocks=blocks, head=head))


def conv1x1_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1]


def conv1x1_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of the 1x1 convs for ``example`` (2 * positions * in * out each)."""
    total, handles = 0, []

    def hook(module, _args, out):
        nonlocal total
        total += 2 * out.shape[0] * out.shape[2] * out.shape[3] * module.in_channels \
            * module.out_channels

    for name in conv1x1_names(model):
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(example)
    for h in handles:
        h.remove()
    return total


# -- running a variant --------------------------------------------------------------------


class StatsTimer:
    """Times the engine's statistics collection (``collect_layer_data``) and samples memory.

    Memory: resident set size read from ``/proc/self/statm`` every 5 ms during
    collection, peak minus the value before (the process's RSS, which torch's CPU
    allocations are part of; freed heap the allocator keeps is reused first, so this
    can under-count). ``None`` where /proc is missing.
    """

    def __init__(self):
        self.seconds = 0.0
        self.peak_rss_mb = 0.0
        self.calls = 0

    def __enter__(self):
        import musco_core.engine.data as engine  # where the engine calls it at each step

        self._engine, self._original = engine, engine.collect_layer_data

        def timed(*args, **kw):
            before = _rss_mb()
            stop, peak = _sample_rss()
            started = time.perf_counter()
            try:
                return self._original(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - started
                stop()
                if before is not None and peak[0] is not None:
                    self.peak_rss_mb = max(self.peak_rss_mb, peak[0] - before)
                self.calls += 1

        engine.collect_layer_data = timed
        return self

    def __exit__(self, *exc):
        self._engine.collect_layer_data = self._original


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sample_rss():
    import threading

    peak = [_rss_mb()]
    done = threading.Event()

    def run():
        while not done.wait(0.005):
            value = _rss_mb()
            if value is not None and (peak[0] is None or value > peak[0]):
                peak[0] = value

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def stop():
        done.set()
        thread.join()

    return stop, peak


def spec_for(variant, *, layer_rate: float, layers: int, refine_seconds: float,
             refine_lr: float, budget_grid: int):
    whiten, per_step, refine, rule = VARIANTS[variant]
    steps = layers if per_step == 0 else -(-layers // per_step)
    decomposition = musco.Decompose("svd", whiten=True) if whiten else "svd"
    # budget: the model-level target itself (scope = "model": the whole model's FLOPs)
    rank = (musco.RankRule("flop_reduction", rate=layer_rate) if rule == "uniform"
            else musco.RankRule("budget", flop_reduction=TARGET, scope="model",
                                grid=budget_grid))
    kw = {}
    if refine:
        kw["refine"] = musco.Refine(f"{refine}_output", steps=1_000_000,
                                    seconds=refine_seconds / steps, lr=refine_lr, seed=0)
    return musco.Spec(rules=[musco.Rule(match="conv1x1", decomposition=decomposition,
                                        rank=rank)],
                      layers_per_step=per_step or 10_000, **kw), steps


def run_variant(model, variant, data, calibration, *, layer_rate, refine_seconds, refine_lr,
                budget_grid, base):
    x_train, y_train, x_test, y_test = data
    example = x_test[:1]
    layers = len(conv1x1_names(model))
    spec, _ = spec_for(variant, layer_rate=layer_rate, layers=layers,
                       refine_seconds=refine_seconds, refine_lr=refine_lr,
                       budget_grid=budget_grid)
    whiten, _, refine, _ = VARIANTS[variant]
    needs_data = whiten or refine or VARIANTS[variant][3] == "budget"
    refine_time = 0.0
    from musco_std.refiners import LayerOutput, ModelOutput

    originals = {cls: cls.refine for cls in (LayerOutput, ModelOutput)}

    def timed(original):
        def timed_refine(*a, **kw):
            nonlocal refine_time
            started = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                refine_time += time.perf_counter() - started
        return timed_refine

    for cls, original in originals.items():
        cls.refine = timed(original)
    try:
        with StatsTimer() as stats, C.Timer() as t:
            compressor = musco.Compressor(model, spec, example_inputs=example,
                                          calibration=calibration if needs_data else None,
                                          progress=False)
            while not compressor.done:
                compressor.step()
    finally:
        for cls, original in originals.items():
            cls.refine = original
    report = compressor.report()
    errors = [r.output_error for s in report.steps for r in s.layers
              if r.status == "compressed" and r.output_error is not None]
    flops = C.count_flops(compressor.model, example)
    row = {"variant": variant, "FLOPs": flops, "FLOPs x": base["FLOPs"] / flops,
           "params": C.count_params(compressor.model),
           "acc": C.accuracy(compressor.model, x_test, y_test),
           "mean output error": sum(errors) / len(errors) if errors else float("nan"),
           "stats s": stats.seconds, "stats peak RSS MB": stats.peak_rss_mb,
           "refine s": refine_time, "compress s": t.seconds,
           "engine model FLOPs x": (report.model_flops_before / report.model_flops_after
                                    if report.model_flops_after else float("nan"))}
    row["params x"] = base["params"] / row["params"]
    row["delta"] = row["acc"] - base["acc"]
    layers_out = [r.to_dict() for s in report.steps for r in s.layers]
    return row, layers_out


def uniform_rate(model, example, flops: int, start: float) -> float:
    """The smallest ``flop_reduction`` rate (to 0.1 %) that gives the model TARGET fewer FLOPs.

    Ranks are whole numbers, so the rate that removes exactly the right FLOPs on paper
    (``start``) overshoots on thin layers; ``Compressor.preview`` prices candidate rates
    without decomposing anything.
    """
    def reduction(rate):
        spec = musco.Spec(rules=[musco.Rule(match="conv1x1", decomposition="svd",
                                            rank=musco.RankRule("flop_reduction", rate=rate))],
                          layers_per_step=10_000)
        rows = musco.Compressor(model, spec, example_inputs=example, inplace=True,
                                progress=False).preview()
        saved = sum(r.flops_before - r.flops_after for r in rows if r.status == "planned")
        return flops / (flops - saved)

    low, high = 1.0, start
    while reduction(high) < TARGET:
        high *= 1.1
    while high / low > 1.001:
        mid = (low + high) / 2
        low, high = (mid, high) if reduction(mid) < TARGET else (low, mid)
    return high


# -- data and training ------------------------------------------------------------------------


def get_data(args):
    root = None if args.synthetic else C.fashion_mnist_dir(args.data)
    if root is None:
        if not args.synthetic:
            print(f"note: {C.FASHION_HINT}\n      using synthetic images instead", flush=True)
        n = (256, 128) if args.smoke else (20000, 5000)
        return C.synthetic_images(*n, seed=args.seed), "synthetic"
    limit = 256 if args.smoke else None
    return C.load_fashion_mnist(root, limit=limit), f"fashion-mnist ({root})"


def trained_model(args, data, source):
    x_train, y_train, _, _ = data
    key = f"mobile_seed{args.seed}_steps{args.train_steps}_b{args.batch}.pt"
    cache = Path(args.cache) / key
    torch.manual_seed(args.seed)
    model = mobile_net()
    cacheable = not args.smoke and source.startswith("fashion-mnist")
    if cacheable and cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        print(f"loaded the trained model from {cache}", flush=True)
        return model.eval(), 0.0
    with C.Timer() as t:
        C.train(model, x_train, y_train, steps=args.train_steps, batch=args.batch,
                lr=args.train_lr, seed=args.seed)
    if cacheable:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    print(f"trained in {t.seconds:.0f}s", flush=True)
    return model.eval(), t.seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data even if installed")
    parser.add_argument("--data", help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(C.RESULTS), help="directory for mobile.json / .md")
    parser.add_argument("--cache", default=str(C.CACHE), help="directory for the trained model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=700)
    parser.add_argument("--train-lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=128, help="training batch")
    parser.add_argument("--calib", type=int, default=512, help="unlabeled calibration images")
    parser.add_argument("--calib-batch", type=int, default=64)
    parser.add_argument("--refine-seconds", type=float, default=120.0,
                        help="wall time of local refinement per variant, split over its steps")
    parser.add_argument("--refine-lr", type=float, default=1e-3)
    parser.add_argument("--budget-grid", type=int, default=6)
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant indices (default: all)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_steps, args.batch, args.calib, args.calib_batch = 10, 16, 32, 16
        args.refine_seconds, args.budget_grid = 1.0, 3
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    data, source = get_data(args)
    model, train_seconds = trained_model(args, data, source)
    x_train, _, x_test, y_test = data
    # unlabeled calibration images: a fixed random subset of the training set
    calibration = C.calibration_batches(x_train, args.calib, args.calib_batch, args.seed + 1000)
    n_calib = sum(len(b) for b in calibration)

    example = x_test[:1]
    base = {"variant": "original", "FLOPs": C.count_flops(model, example),
            "params": C.count_params(model), "acc": C.accuracy(model, x_test, y_test),
            "FLOPs x": 1.0, "params x": 1.0, "delta": 0.0, "compress s": 0.0}
    # the per-layer rate of the 1x1 convs that gives TARGET fewer FLOPs for the whole model
    m = conv1x1_flops(model, example)
    cut = base["FLOPs"] * (1 - 1 / TARGET)
    if cut >= m:
        raise SystemExit(f"the 1x1 convs ({m} of {base['FLOPs']} FLOPs) cannot give "
                         f"{TARGET}x fewer model FLOPs")
    layer_rate = uniform_rate(model, example, base["FLOPs"], m / (m - cut))
    print(f"original: {base['acc']:.2f}% test accuracy, {base['FLOPs'] / 1e6:.2f} MFLOPs "
          f"({100 * m / base['FLOPs']:.0f}% in 1x1 convs), {base['params']} params ({source}); "
          f"1x1-conv rate for {TARGET}x model FLOPs: {layer_rate:.3f}", flush=True)

    names = list(VARIANTS) if args.variants == "all" else [
        list(VARIANTS)[int(i)] for i in args.variants.split(",")]
    def save(final: bool):
        verdicts = [{
            "variant": r["variant"],
            ">=1.5x model FLOPs": r["FLOPs x"] >= TARGET * 0.99,
            "<=1 point loss": r["delta"] >= -1.0,
        } for r in rows[1:]]
        vcols = ["variant", ">=1.5x model FLOPs", "<=1 point loss"]
        total = time.perf_counter() - started
        if final:
            print()
            print(C.text_table(rows, COLUMNS))
            print()
            print(C.text_table(verdicts, vcols))
            print(f"\ntotal {total:.0f}s (training {train_seconds:.0f}s)")

        meta = {"data": source, "smoke": args.smoke, "seed": args.seed, "target": TARGET,
                "layer_rate": layer_rate, "conv1x1_flops": m, "train_steps": args.train_steps,
                "batch": args.batch, "train_lr": args.train_lr, "calib_images": n_calib,
                "calib_batch": args.calib_batch, "refine_seconds": args.refine_seconds,
                "refine_lr": args.refine_lr, "budget_grid": args.budget_grid,
                "train_seconds": train_seconds, "total_seconds": total, "layers": layer_rows,
                "complete": final}
        notes = (
            f"Data: {source}. Inverted-residual network ({base['FLOPs'] / 1e6:.2f} MFLOPs, "
            f"{base['params']} parameters; {100 * m / base['FLOPs']:.0f}% of the FLOPs in its "
            f"{len(conv1x1_names(model))} 1x1 convs) trained for {args.train_steps} steps of batch "
            f"{args.batch} (Adam, one-cycle lr {args.train_lr}). Every variant factorizes the 1x1 "
            f"convs by `svd` for {TARGET}x fewer FLOPs of the whole model (uniform variants: "
            f"`flop_reduction` rate {layer_rate:.3f} on each 1x1 conv; budget: `flop_reduction = "
            f"{TARGET}, scope = \"model\"` over them together), **no fine-tuning, no labels**. Calibration: "
            f"{n_calib} unlabeled training images in batches of {args.calib_batch}; local "
            f"refinement: {args.refine_seconds:g} s of wall time per variant in all (Adam, lr "
            f"{args.refine_lr:g}), split evenly over its steps; 'refine' trains each layer toward "
            "its original output, 'model refine' (`Refine(scope=\"model\")`) toward the original "
            "model's output. 'mean output error': mean over the "
            "compressed layers of the relative output error the engine reports on the calibration "
            "data. 'stats s': time in the engine's statistics collection (Gram matrices; the "
            "budget's damage measurements are not included); peak memory of that collection is in "
            "the JSON ('stats peak RSS MB': /proc/self/statm sampled every 5 ms, peak minus before). "
            "'compress s': Compressor construction and all steps, refinement included.")
        C.write_results(Path(args.out), "mobile",
                        title="Fashion-MNIST inverted-residual net: data-aware SVD of the 1x1 convs",
                        meta=meta, notes=notes,
                        tables=[("rows", "Results", rows, COLUMNS),
                                ("verdicts", "Targets", verdicts, vcols)])
        return verdicts

    rows, layer_rows = [base], {}
    for variant in names:
        row, layers = run_variant(model, variant, data, calibration, layer_rate=layer_rate,
                                  refine_seconds=args.refine_seconds, refine_lr=args.refine_lr,
                                  budget_grid=args.budget_grid, base=base)
        rows.append(row)
        layer_rows[variant] = layers
        print(C.text_table([row], COLUMNS), flush=True)
        save(final=False)
    verdicts = save(final=True)
    return {"rows": rows, "verdicts": verdicts}


if __name__ == "__main__":
    main()
