"""GPU latency of compressed models vs the original: ResNet-18/50 and MiniLM, fp32/bf16, eager/compile.

Models: torchvision-shaped ResNet-18 and ResNet-50 (``_common``, random weights: latency does
not depend on the values) and, when installed, the all-MiniLM-L6-v2 encoder (random
hidden states of 128 tokens as input). Each is compressed once on the CPU: ``tucker2`` on
3x3 convs, ``svd`` on 1x1 convs and Linear layers, ranks by ``flop_reduction`` at 2x with
``round_to=8`` (stem conv and classifier kept). Both the original and the compressed model
are then **fused** (:func:`musco_core.fuse.fuse_for_inference`: BatchNorm folded into the
conv before it, the factorized layers' last conv included), so BatchNorm passes do not
flatter the speedup.

Every configuration (dtype fp32 / bf16 x batch 1 / 64 / 256 x eager / ``torch.compile``,
conv nets in ``channels_last``) times the original and the compressed model interleaved
with :class:`torch.utils.benchmark.Timer` (``blocked_autorange``, which synchronises CUDA
before reading the clock), ``--repeats`` times, and reports medians. ``torch.compile``
runs at the batch sizes in ``--compile-batches`` only (each compile costs tens of seconds);
``--budget`` seconds bound the whole run: configurations left when it is spent are listed
as skipped, so the script finishes in under 5 minutes on one GPU.

    python docs/benchmarks/speed_gpu.py                 # needs CUDA; writes results/speed_gpu.*
    python docs/benchmarks/speed_gpu.py --smoke --out /tmp/b   # tiny model, CPU, 1 config
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark as tbench

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import musco_core as musco  # noqa: E402
from musco_core.fuse import fuse_for_inference  # noqa: E402

COLUMNS = ["model", "dtype", "batch", "mode", "format", "FLOPs x", "original ms",
           "compressed ms", "speedup", "speedup / FLOPs x"]


def spec(exclude, rate: float = 2.0, round_to: int = 8, kxk: bool = True) -> musco.Spec:
    """tucker2 on kxk convs (unless ``kxk`` is false: the smoke run skips HOOI), svd on the rest."""
    rank = musco.RankRule("flop_reduction", rate=rate, round_to=round_to)
    rules = [musco.Rule(match="conv_kxk", decomposition="tucker2", rank=rank)] if kxk else []
    rules.append(musco.Rule(match=["conv1x1", "linear"], decomposition="svd", rank=rank))
    return musco.Spec(rules=rules, exclude=exclude, layers_per_step=10_000)


def compress(model: nn.Module, example, exclude, kxk: bool = True) -> nn.Module:
    compressor = musco.Compressor(model, spec(exclude, kxk=kxk), example_inputs=example,
                                  progress=False)
    while not compressor.done:
        compressor.step()
    return compressor.model.eval()


def models(smoke: bool):
    """``(name, factory, exclude, input shape without batch, conv net?)``."""
    if smoke:
        tiny = lambda: C.ResNet(C.Bottleneck, (1, 1, 1, 1), width=8, num_classes=10)  # noqa: E731
        return [("tiny-resnet", tiny, ["conv1", "fc"], (3, 16, 16), True)]
    out = [("resnet18", C.resnet18, ["conv1", "fc"], (3, 224, 224), True),
           ("resnet50", C.resnet50, ["conv1", "fc"], (3, 224, 224), True)]
    path = C.minilm_path()
    if path is not None:
        from minilm_linear import SentenceEmbedder

        encoder = lambda: SentenceEmbedder(path).encoder  # noqa: E731
        out.append(("minilm-encoder", encoder, [], (128, 384), False))
    else:
        print(C.MINILM_HINT, "- MiniLM is left out", flush=True)
    return out


def measure(variants: dict[str, nn.Module], x: torch.Tensor, *, repeats: int, warmup: int,
            min_run_time: float) -> dict[str, float]:
    """Median seconds per call of each variant, measured interleaved with the Timer."""
    timers = {name: tbench.Timer(stmt="model(x)", globals={"model": m, "x": x},
                                 num_threads=torch.get_num_threads())
              for name, m in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for m in variants.values():
            for _ in range(warmup):
                m(x)
        names = list(variants)
        for i in range(repeats):
            for name in names[i % len(names):] + names[: i % len(names)]:
                times[name].append(timers[name].blocked_autorange(min_run_time=min_run_time).median)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny ResNet on the CPU (svd on its 1x1 convs only), fp32, "
                             "batch 2, eager, one repeat")
    parser.add_argument("--out", default=str(C.RESULTS), help="directory for speed_gpu.json/.md")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--compile-batches", default="64",
                        help="batch sizes at which torch.compile runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.05,
                        help="seconds per Timer measurement")
    parser.add_argument("--budget", type=float, default=270.0,
                        help="seconds for the whole run; later configurations are skipped")
    parser.add_argument("--models", default="all", help="comma-separated subset of model names")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --smoke, else unchanged)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)

    if args.smoke:
        device = torch.device("cpu")
        batches, dtypes, modes, compile_batches = [2], [torch.float32], ["eager"], set()
        repeats, min_run_time = 1, 0.0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("speed_gpu.py needs a CUDA GPU (use --smoke for the CPU check)")
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        batches = [int(b) for b in args.batches.split(",")]
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        modes = args.modes.split(",")
        compile_batches = {int(b) for b in args.compile_batches.split(",") if b}
        repeats, min_run_time = args.repeats, args.min_run_time

    rows, skipped = [], []
    for name, factory, exclude, shape, conv_net in models(args.smoke):
        if args.models != "all" and name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        original = factory().eval()
        probe = torch.randn(1, *shape)
        with C.Timer() as t:
            compressed = compress(original, probe, exclude, kxk=not args.smoke)
        flops_x = C.count_flops(original, probe) / C.count_flops(compressed, probe)
        print(f"{name}: {flops_x:.2f}x fewer FLOPs, compressed in {t.seconds:.1f}s", flush=True)
        fused = {"original": fuse_for_inference(original),
                 "compressed": fuse_for_inference(compressed)}
        fmt = torch.channels_last if conv_net else torch.contiguous_format
        fmt_name = "channels_last" if conv_net else "contiguous"
        for dtype in dtypes:
            on_device = {k: copy.deepcopy(m).to(device=device, dtype=dtype, memory_format=fmt)
                         for k, m in fused.items()}
            for mode in modes:
                for batch in batches:
                    config = {"model": name, "dtype": str(dtype).removeprefix("torch."),
                              "batch": batch, "mode": mode, "format": fmt_name}
                    if mode == "compile" and batch not in compile_batches:
                        continue
                    if time.perf_counter() - started > args.budget:
                        skipped.append({**config, "reason": "time budget spent"})
                        continue
                    x = torch.randn(batch, *shape, device=device, dtype=dtype)
                    if conv_net:
                        x = x.contiguous(memory_format=fmt)
                    variants = on_device
                    if mode == "compile":
                        torch._dynamo.reset()
                        variants = {k: torch.compile(m, dynamic=False)
                                    for k, m in on_device.items()}
                    try:
                        t = measure(variants, x, repeats=repeats, warmup=3,
                                    min_run_time=min_run_time)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report it
                        skipped.append({**config, "reason": f"{type(exc).__name__}: {exc}"[:200]})
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    speedup = t["original"] / t["compressed"]
                    row = {**config, "FLOPs x": flops_x, "original ms": t["original"] * 1e3,
                           "compressed ms": t["compressed"] * 1e3, "speedup": speedup,
                           "speedup / FLOPs x": speedup / flops_x}
                    rows.append(row)
                    print(C.text_table([row], COLUMNS).splitlines()[-1], flush=True)
            del on_device
            if device.type == "cuda":
                torch.cuda.empty_cache()

    total = time.perf_counter() - started
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    print(f"\n{C.text_table(rows, COLUMNS)}\n\ntotal {total:.0f}s on {device_name}")
    meta = {"smoke": args.smoke, "device": device_name, "total_seconds": total,
            "repeats": repeats, "min_run_time": min_run_time, "skipped": skipped}
    notes = (f"Device: **{device_name}**. Original and compressed (tucker2 / svd, "
             "flop_reduction 2x, round_to=8) both fused (BatchNorm folded); medians of "
             f"{repeats} interleaved `torch.utils.benchmark.Timer` measurements "
             "(CUDA synchronised). Conv nets in channels_last. "
             f"{len(skipped)} configuration(s) skipped (see the JSON).")
    C.write_results(Path(args.out), "speed_gpu", title="GPU latency: compressed vs original",
                    meta=meta, notes=notes, tables=[("rows", "Timings", rows, COLUMNS)])
    return {"rows": rows, "skipped": skipped, "seconds": total}


if __name__ == "__main__":
    main()
