"""Wall-clock CPU latency of compressed models vs the original, in both memory formats.

Models: the Fashion-MNIST CNN (``_common.small_vgg``) and torchvision-shaped ResNet-18 and
ResNet-50 (built here, random weights: latency does not depend on the values). Each is
compressed with ``tucker2`` on 3x3 convs and ``svd`` on 1x1 convs and Linear layers (the
stem conv and the classifier are kept), ranks by ``flop_reduction`` at 2x and 4x, and the same
again with ``round_to`` 8 and 16. Every variant is timed against the original with
``musco_core.speed.benchmark``: one process, eval mode, ``torch.inference_mode``,
``torch.set_num_threads(2)``, warm-up, then interleaved repeats; medians are reported, in
``torch.contiguous_format`` and ``torch.channels_last``.

Batch 1 at 224x224 (28x28 for the CNN) and batch 32 at 112x112 (full size at batch 32 takes
too long on 2 cores). Writes ``speed.json`` and ``speed.md`` to ``--out``.

    python docs/benchmarks/speed_cpu.py              # full run, several minutes
    python docs/benchmarks/speed_cpu.py --smoke      # tiny model and input, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import musco_core as musco  # noqa: E402
from musco_core.speed import benchmark  # noqa: E402

COLUMNS = ["model", "input", "variant", "FLOPs x", "format", "median ms",
           "speedup", "speedup / FLOPs x", "speedup vs contiguous original"]
SUMMARY = ["model", "input", "variant", "FLOPs x", "best format", "speedup at best",
           "contiguous speedup", "channels_last speedup"]


def models(smoke: bool):
    """(name, factory, exclude, [(label, input shape, repeats)])."""
    if smoke:
        tiny = lambda: C.ResNet(C.Bottleneck, (1, 1, 1, 1), width=8, num_classes=10)  # noqa: E731
        return [("cnn", C.small_vgg, ["features.conv1", "classifier.fc2"],
                 [("1x1x28x28", (1, 1, 28, 28), 3)]),
                ("tiny-resnet", tiny, ["conv1", "fc"], [("2x3x32x32", (2, 3, 32, 32), 3)])]
    return [
        ("cnn", C.small_vgg, ["features.conv1", "classifier.fc2"],
         [("1x1x28x28", (1, 1, 28, 28), 30), ("32x1x28x28", (32, 1, 28, 28), 20)]),
        ("resnet18", C.resnet18, ["conv1", "fc"],
         [("1x3x224x224", (1, 3, 224, 224), 11), ("32x3x112x112", (32, 3, 112, 112), 5)]),
        ("resnet50", C.resnet50, ["conv1", "fc"],
         [("1x3x224x224", (1, 3, 224, 224), 9), ("32x3x112x112", (32, 3, 112, 112), 3)]),
    ]


def spec(rate: float, round_to: int, exclude) -> musco.Spec:
    limits = {"round_to": round_to} if round_to > 1 else {}
    rank = musco.RankRule("flop_reduction", rate=rate, **limits)
    return musco.Spec(rules=[musco.Rule(match="conv_kxk", decomposition="tucker2", rank=rank),
                             musco.Rule(match=["conv1x1", "linear"], decomposition="svd",
                                        rank=rank)],
                      exclude=exclude, layers_per_step=10_000)


def compress(model: nn.Module, example, rate: float, round_to: int, exclude) -> nn.Module:
    compressor = musco.Compressor(model, spec(rate, round_to, exclude), example_inputs=example,
                                  progress=False)
    while not compressor.done:
        compressor.step()
    return compressor.model.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and input, seconds")
    parser.add_argument("--out", default=str(C.RESULTS), help="directory for speed.json / .md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rates", default="2,4")
    parser.add_argument("--round-to", default="1,8,16", help="round_to values (1 = none)")
    parser.add_argument("--models", default="all", help="comma-separated subset of model names")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = [float(r) for r in args.rates.split(",")]
    round_tos = [int(r) for r in args.round_to.split(",")]
    if args.smoke:
        rates, round_tos = [2.0], [1, 8]
    started = time.perf_counter()

    rows, summary, advice = [], [], {}
    for name, factory, exclude, inputs in models(args.smoke):
        if args.models != "all" and name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        model = factory().eval()
        probe = torch.randn(1, *inputs[0][1][1:])
        variants, flops_x = {}, {}
        base_flops = C.count_flops(model, probe)
        for rate in rates:
            for rt in round_tos:
                label = f"{rate:g}x" + (f" round_to={rt}" if rt > 1 else "")
                with C.Timer() as t:
                    variants[label] = compress(model, probe, rate, rt, exclude)
                flops_x[label] = base_flops / C.count_flops(variants[label], probe)
                print(f"{name} {label}: {flops_x[label]:.2f}x fewer FLOPs, "
                      f"{C.count_params(model) / C.count_params(variants[label]):.2f}x fewer "
                      f"params, compressed in {t.seconds:.1f}s", flush=True)
        for label, shape, repeats in inputs:
            x = torch.randn(*shape)
            report = benchmark(model, variants, x, num_threads=args.threads,
                               warmup=2 if shape[0] > 1 else 3, repeats=repeats)
            advice[f"{name} {label}"] = report.advice()
            base_c = report.timing("original", "contiguous").median
            for t in report.timings:
                fx = 1.0 if t.model == "original" else flops_x[t.model]
                s = report.speedup(t.model, t.memory_format)
                rows.append({"model": name, "input": label, "variant": t.model, "FLOPs x": fx,
                             "format": t.memory_format, "median ms": t.median * 1e3,
                             "speedup": s, "speedup / FLOPs x": s / fx,
                             "speedup vs contiguous original": base_c / t.median})
            for v in ["original", *variants]:
                best = report.best(v)
                summary.append({
                    "model": name, "input": label, "variant": v,
                    "FLOPs x": 1.0 if v == "original" else flops_x[v],
                    "best format": best.memory_format,
                    "speedup at best": report.best("original").median / best.median,
                    "contiguous speedup": report.speedup(v, "contiguous"),
                    "channels_last speedup": report.speedup(v, "channels_last")})
            print(report, flush=True)
            print(report.advice(), flush=True)

    total = time.perf_counter() - started
    print()
    print(C.text_table(summary, SUMMARY))
    print(f"\ntotal {total:.0f}s")
    meta = {"smoke": args.smoke, "threads": args.threads, "rates": rates,
            "round_to": round_tos, "total_seconds": total, "advice": advice}
    notes = (
        "Random-weight models, eval mode, `torch.inference_mode`, "
        f"`torch.set_num_threads({args.threads})`; `musco_core.speed.benchmark` times every "
        "variant and format interleaved in one process after warm-up and reports medians. "
        "`tucker2` on 3x3 convs, `svd` on 1x1 convs and Linear, `flop_reduction` at the "
        "variant's rate (stem conv and classifier kept). 'speedup' is the original's median "
        "in the **same** memory format over the variant's; 'speedup at best' compares each "
        "at its own fastest format; 'speedup vs contiguous original' compares with the "
        "original as most people run it. Batch 32 uses 112x112 inputs for the ResNets.")
    C.write_results(Path(args.out), "speed", title="CPU latency: compressed vs original",
                    meta=meta, notes=notes,
                    tables=[("summary", "Summary (speedup over the original)", summary, SUMMARY),
                            ("rows", "All timings", rows, COLUMNS)])
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
