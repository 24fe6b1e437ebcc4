"""Benchmark tucker2 / cp3 / cp4 against plain tensorly calls on ResNet 3x3 conv shapes.

Weights are planted low-rank plus noise (float32): for tucker2 an exact Tucker-2
at the ranks of a 4x parameter reduction, for cp3 / cp4 an exact CP at the 4x
rank, each plus 5% relative Gaussian noise. Each decomposition runs at the ranks
giving 2x and 4x parameter reduction (``rank_for_param_count``) and is compared
with the baseline at the same ranks:

* tucker2: ``tensorly.decomposition.partial_tucker(W, rank=[r_out, r_in], modes=[0, 1])``
* cp3 / cp4: ``tensorly.decomposition.parafac(W, R)`` on the (out, in, kh*kw) / 4-way tensor

both with default settings on tensorly's NumPy backend. One thread everywhere
(``torch.set_num_threads(1)``, ``OMP/MKL/OPENBLAS_NUM_THREADS=1``). The relative
error is ``|W - W'|_F / |W|_F``. Writes ``decompositions.json`` and ``.md`` to
``--out`` (default ``docs/benchmarks/results``) and prints the table.

    python docs/benchmarks/decompositions.py            # full run (several minutes)
    python docs/benchmarks/decompositions.py --smoke    # tiny shapes, seconds
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorly as tl  # noqa: E402
import torch  # noqa: E402
from tensorly.decomposition import parafac, partial_tucker  # noqa: E402
from torch import nn  # noqa: E402

from musco_core.testing import add_noise, cp_weight, tucker2_weight  # noqa: E402
from musco_std.cp import CP3, CP4  # noqa: E402
from musco_std.tucker2 import Tucker2  # noqa: E402

#: (out, in) of the 3x3 convolutions, and where they occur.
RESNET_3X3 = {
    (64, 64): "resnet18 layer1, resnet50 layer1",
    (128, 64): "resnet18 layer2.0.conv1",
    (128, 128): "resnet18 layer2, resnet50 layer2",
    (256, 128): "resnet18 layer3.0.conv1",
    (256, 256): "resnet18 layer3, resnet50 layer3",
    (512, 256): "resnet18 layer4.0.conv1",
    (512, 512): "resnet18 layer4, resnet50 layer4",
}
SMOKE = {(8, 6): "smoke", (12, 10): "smoke"}
RATES = (2.0, 4.0)
NOISE = 0.05


def _rel(w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(w - approx) / np.linalg.norm(w))


def _timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _planted(name: str, conv: nn.Conv2d, decomposition, seed: int) -> torch.Tensor:
    shape = tuple(conv.weight.shape)
    rank = decomposition.rank_for_param_count(conv, conv.weight.numel() / 4.0)
    if name == "tucker2":
        w = tucker2_weight(shape, rank, seed=seed)
    else:
        w = cp_weight(shape, rank, seed=seed)
    return add_noise(w, NOISE, seed=seed + 1).float()


def _baseline(name: str, w: np.ndarray, rank):
    np.random.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "tucker2":
            r_in, r_out = rank
            (core, factors), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1])
            return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
        tensor = w.reshape(w.shape[0], w.shape[1], -1) if name == "cp3" else w
        return tl.cp_to_tensor(parafac(tensor, rank)).reshape(w.shape)


def run(shapes: dict, repeats: int, names: list[str], cp_max_channels: int = 10**9) -> list[dict]:
    decompositions = {"tucker2": Tucker2(), "cp3": CP3(), "cp4": CP4()}
    rows = []
    for (cout, cin), where in shapes.items():
        conv = nn.Conv2d(cin, cout, 3, bias=False)
        for name in names:
            if name != "tucker2" and max(cout, cin) > cp_max_channels:
                continue
            dec = decompositions[name]
            w = _planted(name, conv, dec, seed=cout + cin)
            w_np = w.numpy()
            for rate in RATES:
                rank = dec.rank_for_param_count(conv, conv.weight.numel() / rate)
                params = dec.Params()
                ours_t, factors = _timed(lambda: dec.decompose(w, rank, params), repeats)
                ours_e = _rel(w_np, dec.reconstruct(factors).numpy())
                base_t, approx = _timed(lambda: _baseline(name, w_np, rank), 1)
                base_e = _rel(w_np, approx)
                row = {"shape": [cout, cin, 3, 3], "where": where, "decomposition": name,
                       "rate": rate, "rank": list(rank) if isinstance(rank, tuple) else rank,
                       "ours_s": ours_t, "ours_error": ours_e, "baseline_s": base_t,
                       "baseline_error": base_e, "speedup": base_t / ours_t,
                       "error_ratio": ours_e / base_e}
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


HEADER = ("| decomposition | shape (out, in) | rate | rank | ours s | tensorly s | speedup "
          "| ours error | tensorly error | error ours/tensorly |")


def _format_row(r: dict) -> str:
    return (f"| {r['decomposition']} | {r['shape'][0]}x{r['shape'][1]} | {r['rate']:g}x "
            f"| {r['rank']} | {r['ours_s']:.3f} | {r['baseline_s']:.3f} | {r['speedup']:.1f}x "
            f"| {r['ours_error']:.5f} | {r['baseline_error']:.5f} | {r['error_ratio']:.4f} |")


def table(rows: list[dict]) -> str:
    sep = "|" + "---|" * (HEADER.count("|") - 1)
    return "\n".join([HEADER, sep] + [_format_row(r) for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs in seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="directory for decompositions.json and decompositions.md")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timing repeats of our decompositions (best of); baseline runs once")
    parser.add_argument("--decompositions", default="tucker2,cp3,cp4")
    parser.add_argument("--max-channels", type=int, default=512,
                        help="skip shapes with more channels")
    parser.add_argument("--cp-max-channels", type=int, default=128,
                        help="run cp3/cp4 only on shapes up to this many channels: the "
                             "tensorly parafac baseline takes minutes per larger shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shapes = SMOKE if args.smoke else {
        s: w for s, w in RESNET_3X3.items() if max(s) <= args.max_channels}
    names = args.decompositions.split(",")
    print(HEADER, flush=True)
    started = time.perf_counter()
    rows = run(shapes, args.repeats, names, args.cp_max_channels)
    meta = {"torch": torch.__version__, "tensorly": tl.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "threads": 1, "noise": NOISE, "smoke": args.smoke, "repeats": args.repeats,
            "cp_max_channels": args.cp_max_channels,
            "seconds": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decompositions.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                             indent=2) + "\n")
    md = ["# Decompositions vs plain tensorly", "",
          f"torch {meta['torch']}, tensorly {meta['tensorly']} (NumPy backend, default "
          f"settings), one thread, float32 weights planted low rank + {NOISE:.0%} noise; "
          f"`python docs/benchmarks/decompositions.py{' --smoke' if args.smoke else ''}`.",
          "", table(rows), ""]
    (args.out / "decompositions.md").write_text("\n".join(md))
    print(f"\nwrote {args.out / 'decompositions.json'} and .md "
          f"({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
