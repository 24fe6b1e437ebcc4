"""Benchmark: time of each rank rule over every layer of ResNet-18/50- and encoder-shaped weights.

Weights are random with a planted structure (each layer's ``out x rest`` matrix is
rank ``out / 4`` plus noise); shapes are hard-coded (no torchvision, no downloads),
FLOPs are those of a 224x224 input (ResNets) or 128 tokens (encoder). 1x1 convs and
Linear layers use ``svd``; kxk convs use ``tucker2``. The ``encoder`` is a 110M-class
sentence encoder's 72 Linear layers (12 blocks of q, k, v, o at 768 x 768 and the MLP's
768 x 3072 and 3072 x 768), the case where issue 11 measured vbmf/energy at 4-6x the
cost of flop_reduction. Each rule is timed once per layer ("rule") and twice per layer
("plan + step": the engine asks once when it plans and again in step(); spectra are
cached per unchanged layer, so the second ask is free); the spectrum cache is cleared
before every repeat. It also times EVBMF as musco computes it (eigenvalues of the
Gram matrix) against EVBMF after a full SVD with ``full_matrices=True``, as the
seed (musco-pytorch) does, on the same matrices.

    python docs/benchmarks/rank_rules.py            # full run, writes docs/benchmarks/results/
    python docs/benchmarks/rank_rules.py --smoke --out /tmp/bench

Runs on 2 threads (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def resnet_layers(depth: int) -> list[tuple[str, int, int, int, int, int]]:
    """``(name, cin, cout, kernel, stride, input size)`` of every conv and the fc of a ResNet."""
    layers = [("conv1", 3, 64, 7, 2, 224)]
    size, cin = 56, 64
    if depth == 18:
        for stage, (width, blocks) in enumerate([(64, 2), (128, 2), (256, 2), (512, 2)], 1):
            for b in range(blocks):
                stride = 2 if stage > 1 and b == 0 else 1
                p = f"layer{stage}.{b}"
                layers.append((f"{p}.conv1", cin, width, 3, stride, size))
                out = size // stride
                layers.append((f"{p}.conv2", width, width, 3, 1, out))
                if stride != 1 or cin != width:
                    layers.append((f"{p}.downsample.0", cin, width, 1, stride, size))
                cin, size = width, out
        layers.append(("fc", 512, 1000, 0, 1, 1))
        return layers
    if depth == 50:
        for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], 1):
            out_c = 4 * width
            for b in range(blocks):
                stride = 2 if stage > 1 and b == 0 else 1
                p = f"layer{stage}.{b}"
                out = size // stride
                layers.append((f"{p}.conv1", cin, width, 1, 1, size))
                layers.append((f"{p}.conv2", width, width, 3, stride, size))
                layers.append((f"{p}.conv3", width, out_c, 1, 1, out))
                if b == 0:
                    layers.append((f"{p}.downsample.0", cin, out_c, 1, stride, size))
                cin, size = out_c, out
        layers.append(("fc", 2048, 1000, 0, 1, 1))
        return layers
    raise ValueError(f"depth must be 18 or 50, got {depth}")


def encoder_layers(blocks: int = 12, dim: int = 768, hidden: int = 3072,
                   tokens: int = 128) -> list[tuple[str, int, int, int, int, int]]:
    """The Linear layers of a BERT-base-shaped encoder: ``(name, in, out, 0, 1, tokens)``."""
    layers = []
    for b in range(blocks):
        for name in ("query", "key", "value", "attention.output"):
            layers.append((f"layer.{b}.{name}", dim, dim, 0, 1, tokens))
        layers.append((f"layer.{b}.intermediate", dim, hidden, 0, 1, tokens))
        layers.append((f"layer.{b}.output", hidden, dim, 0, 1, tokens))
    return layers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="ResNet-18 only, first layers only, one repeat (seconds)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results",
                        help="folder for rank_rules.json and rank_rules.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="best of N (full run)")
    args = parser.parse_args(argv)
    _set_threads(args.threads)

    import numpy as np
    import torch
    from torch import nn

    import musco_core as musco
    from musco_core.limits import RankLimits
    from musco_core.stats import LayerStats
    from musco_std.rank_rules import (
        VBMF,
        Energy,
        EnergyParams,
        FlopReduction,
        FlopReductionParams,
        ParamReduction,
        ParamReductionParams,
        VBMFParams,
        _SPECTRA,
    )
    from musco_std.svd import SVD
    from musco_std.tucker2 import Tucker2
    from musco_std.vbmf import evbmf

    torch.set_num_threads(args.threads)

    kxk, kxk_name = Tucker2(), "tucker2"
    svd = SVD()

    gen = torch.Generator().manual_seed(0)

    def build(entry):
        name, cin, cout, k, stride, size = entry
        if k == 0:  # a Linear layer on `size` rows (tokens)
            module = nn.utils.skip_init(nn.Linear, cin, cout)
            in_shape, out_shape = (size, cin), (size, cout)
            flops = 2 * size * cin * cout
        else:
            module = nn.utils.skip_init(nn.Conv2d, cin, cout, k, stride=stride, padding=k // 2,
                                        bias=False)
            out = (size + 2 * (k // 2) - k) // stride + 1
            in_shape, out_shape = (1, cin, size, size), (1, cout, out, out)
            flops = 2 * cout * cin * k * k * out * out
        rest = module.weight[0].numel()
        r = max(1, cout // 4)
        w = torch.randn(cout, r, generator=gen) @ torch.randn(r, rest, generator=gen) / r**0.5
        w += 0.3 * torch.randn(cout, rest, generator=gen)
        with torch.no_grad():
            module.weight.copy_(w.reshape(module.weight.shape))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        params = sum(p.numel() for p in module.parameters())
        stats = LayerStats(in_shape, out_shape, params, flops, 1)
        dec = kxk if k > 1 else svd
        return musco.Layer(name, module, stats), dec

    rules = [
        ("param_reduction", ParamReduction(), ParamReductionParams(rate=2.0)),
        ("flop_reduction", FlopReduction(), FlopReductionParams(rate=2.0)),
        ("vbmf", VBMF(), VBMFParams(weakening=0.8)),
        ("energy", Energy(), EnergyParams(fraction=0.9)),
    ]
    limits = RankLimits(round_to=8)
    repeats = 1 if args.smoke else args.repeats
    models = {"resnet18": resnet_layers(18), "encoder": encoder_layers()}
    if not args.smoke:
        models["resnet50"] = resnet_layers(50)
    load_before = os.getloadavg()[0]
    results: dict = {
        "machine": {"threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "cpu": platform.processor()
                    or platform.machine(), "cores": os.cpu_count()},
        "kxk_decomposition": kxk_name, "smoke": args.smoke, "repeats": repeats, "models": {},
    }

    def run_rule(rule, params, layers, asks=1):
        best, best_cpu = float("inf"), float("inf")
        ranks = None
        for _ in range(repeats):
            _SPECTRA.clear()
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(asks):
                out = []
                for layer, dec in layers:
                    rank = rule.select(layer, dec, params)
                    if rank is not None:
                        rank = limits.apply(rank, dec.full_rank(layer.module), rule.rounding)
                    out.append(rank)
            best = min(best, time.perf_counter() - started)
            best_cpu = min(best_cpu, time.process_time() - cpu)
            ranks = out
        return best, best_cpu, ranks

    for model, entries in models.items():
        if args.smoke:
            entries = entries[:2] if model == "encoder" else entries[:6] + entries[-1:]
        layers = [build(e) for e in entries]
        # warm-up: the first calls into LAPACK and scipy pay one-off costs
        VBMF().select(layers[1][0], layers[1][1], VBMFParams())
        row = {"layers": len(layers), "rules": {}}
        for label, rule, params in rules:
            seconds, cpu_seconds, ranks = run_rule(rule, params, layers)
            twice, twice_cpu, _ = run_rule(rule, params, layers, asks=2)
            before = sum(layer.stats.params for layer, _ in layers)
            after = sum(dec.param_count(layer.module, r) if r is not None else layer.stats.params
                        for (layer, dec), r in zip(layers, ranks))
            row["rules"][label] = {"seconds": seconds, "cpu_seconds": cpu_seconds,
                                   "plan_step_seconds": twice,
                                   "plan_step_cpu_seconds": twice_cpu,
                                   "params_ratio": before / after}
        # EVBMF: Gram eigenvalues (musco) vs full SVD with full_matrices=True (the seed)
        matrices = []
        for layer, dec in layers:
            matrices += [m for m in dec.rank_matrices(layer.module)]
        if args.smoke:  # a full SVD of conv1's 3 x 3136 unfolding alone takes seconds
            matrices = [m for m in matrices if max(m.shape) <= 1200][:4]
        started, cpu = time.perf_counter(), time.process_time()
        fast = [evbmf(m).rank for m in matrices]
        fast_s, fast_cpu = time.perf_counter() - started, time.process_time() - cpu
        started, cpu = time.perf_counter(), time.process_time()
        slow = []
        for m in matrices:
            y = m.detach().double().numpy()
            if y.shape[0] > y.shape[1]:
                y = y.T
            _, s, _ = np.linalg.svd(y, full_matrices=True)
            slow.append(evbmf(torch.from_numpy(s), shape=y.shape).rank)
        slow_s, slow_cpu = time.perf_counter() - started, time.process_time() - cpu
        row["evbmf"] = {"matrices": len(matrices), "gram_seconds": fast_s,
                        "gram_cpu_seconds": fast_cpu, "full_svd_seconds": slow_s,
                        "full_svd_cpu_seconds": slow_cpu, "speedup": slow_s / fast_s,
                        "cpu_speedup": slow_cpu / fast_cpu,
                        "rank_mismatches": sum(a != b for a, b in zip(fast, slow))}
        results["models"][model] = row

    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    if "resnet50" in results["models"]:
        rows = results["models"]["resnet50"]["rules"].values()
        slowest = max(r["seconds"] for r in rows)
        slowest_cpu = max(r["cpu_seconds"] for r in rows)
        results["target"] = {"resnet50_slowest_rule_seconds": slowest,
                             "resnet50_slowest_rule_cpu_seconds": slowest_cpu,
                             "under_2s": slowest < 2.0, "under_2s_cpu": slowest_cpu < 2.0}

    lines = [
        f"Rank rules over every layer, best of {repeats}, {args.threads} threads, "
        f"torch {torch.__version__}; kxk convs: {kxk_name}; 1x1 convs and Linear: svd; round_to=8; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"({os.cpu_count()} cores; other processes share them).",
        "",
        "Wall seconds, and CPU seconds of this process (with other processes on the",
        "cores, CPU time is the steadier figure; with 1 thread it is the uncontended time).",
        "",
        "| model | layers | rule | wall s | CPU s | plan + step wall / CPU s | "
        "params before/after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, row in results["models"].items():
        for label, r in row["rules"].items():
            lines.append(f"| {model} | {row['layers']} | {label} | {r['seconds']:.3f} | "
                         f"{r['cpu_seconds']:.3f} | {r['plan_step_seconds']:.3f} / "
                         f"{r['plan_step_cpu_seconds']:.3f} | {r['params_ratio']:.2f}x |")
    lines += ["", "| model | matrices | EVBMF (Gram) wall / CPU s | EVBMF after full SVD "
                  "wall / CPU s | ratio wall / CPU | rank mismatches |",
              "| --- | --- | --- | --- | --- | --- |"]
    for model, row in results["models"].items():
        e = row["evbmf"]
        lines.append(f"| {model} | {e['matrices']} | {e['gram_seconds']:.3f} / "
                     f"{e['gram_cpu_seconds']:.3f} | {e['full_svd_seconds']:.3f} / "
                     f"{e['full_svd_cpu_seconds']:.3f} | {e['speedup']:.1f}x / "
                     f"{e['cpu_speedup']:.1f}x | {e['rank_mismatches']} |")
    if "target" in results:
        t = results["target"]
        lines += ["", f"Target (every ResNet-50 layer ranked in < 2 s by each rule): slowest rule "
                      f"{t['resnet50_slowest_rule_seconds']:.3f} s wall "
                      f"({'met' if t['under_2s'] else 'NOT met'}), "
                      f"{t['resnet50_slowest_rule_cpu_seconds']:.3f} s CPU "
                      f"({'met' if t['under_2s_cpu'] else 'NOT met'})."]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rank_rules.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "rank_rules.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
