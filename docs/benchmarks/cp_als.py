"""CP-ALS swamps: planted-CP recovery and time per layer, before / after restarts, vs tensorly.

Two tables (issue 19, item 7):

1. **Recovery.** Planted exact rank-5 CPs with i.i.d. standard Gaussian factors (seeds
   ``0 .. --seeds - 1``), stored as float32 ``Conv2d(16, 24, 3)`` weights: for cp4 the
   4-way CP of shape (24, 16, 3, 3), for cp3 the 3-way CP of shape (24, 16, 9) (what cp3
   factorizes: (out, in, kh*kw)) reshaped to the conv. A seed counts as recovered when
   ``|W - W'| / |W| < 1e-4``.
2. **Time per layer** on 3x3 conv shapes (``--channels``, default 64 and 128 channels in
   and out): a random Gaussian weight and a planted exact CP (i.i.d. Gaussian factors)
   at rank = 1/4 of the full rank, and a weight planted at the rank of a 4x parameter
   reduction plus 5% relative noise (as in ``decompositions.py``) at that rank.

Configurations:

* ``before``: ``CPParams(restarts=0)``, the single-start ALS of issue 10 (bit-identical to
  the old loop: the restarts are the only change, so "before" is reachable through Params);
* ``after``: ``CPParams()`` (default, ``restarts=1``);
* ``after, restarts=2``: two restarts (recovery table only);
* ``fast``: ``CPParams(tol=1e-4)`` and ``fast, restarts=0``: ``CPParams(tol=1e-4, restarts=0)``;
* ``tensorly``: ``parafac(T, R, init="svd", n_iter_max=500, linesearch=True,
  random_state=0)`` (its default ``tol=1e-8`` on the absolute change of the relative
  error) on the float64 copy of the weight, NumPy backend; in table 2 only up to
  ``--tensorly-max-channels`` (default 64: it takes minutes per 128-channel layer);
* ``tensorly defaults``: ``parafac(T, R, init="svd", random_state=0)`` (100 sweeps, no line
  search; recovery table only).

One thread everywhere (``torch.set_num_threads(1)``, ``OMP/MKL/OPENBLAS_NUM_THREADS=1``);
times are wall-clock seconds of one call (best of ``--repeats``). Writes ``cp_als.json`` and
``cp_als.md`` to ``--out`` (default ``docs/benchmarks/results``) and prints the tables.

    python docs/benchmarks/cp_als.py            # full run (about 10 minutes)
    python docs/benchmarks/cp_als.py --smoke    # 3 seeds, 8 channels, seconds
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorly as tl  # noqa: E402
import torch  # noqa: E402
from tensorly.decomposition import parafac  # noqa: E402
from torch import nn  # noqa: E402

from musco_core.testing import add_noise, cp_weight  # noqa: E402
from musco_std.cp import CP3, CP4, CPParams, cp_reconstruct  # noqa: E402

DECOMPOSITIONS = {"cp4": CP4(), "cp3": CP3()}
RECOVERED = 1e-4
OURS = {
    "before": CPParams(restarts=0),
    "after": CPParams(),
    "after, restarts=2": CPParams(restarts=2),
    "fast": CPParams(tol=1e-4),
    "fast, restarts=0": CPParams(tol=1e-4, restarts=0),
}
TIMED = ("before", "after", "fast", "fast, restarts=0")


def planted(kind: str, cout: int, cin: int, rank: int, seed: int) -> torch.Tensor:
    """An exact CP with i.i.d. N(0, 1) factors as a float32 (cout, cin, 3, 3) weight."""
    modes = (cout, cin, 3, 3) if kind == "cp4" else (cout, cin, 9)
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in modes]
    return cp_reconstruct(factors).reshape(cout, cin, 3, 3).float()


def _rel(w: torch.Tensor, approx: torch.Tensor) -> float:
    w = w.double()
    return float(torch.linalg.vector_norm(w - approx.double()) / torch.linalg.vector_norm(w))


def _timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def ours(kind: str, w: torch.Tensor, rank: int, params: CPParams, repeats: int = 1):
    dec = DECOMPOSITIONS[kind]
    seconds, factors = _timed(lambda: dec.decompose(w, rank, params), repeats)
    return seconds, _rel(w, dec.reconstruct(factors))


def tensorly(kind: str, w: torch.Tensor, rank: int, repeats: int = 1, defaults: bool = False):
    x = w.double().numpy()
    x = x.reshape(x.shape[0], x.shape[1], -1) if kind == "cp3" else x
    settings = {} if defaults else {"n_iter_max": 500, "linesearch": True}

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return parafac(x, rank, init="svd", random_state=0, **settings)

    seconds, cp = _timed(run, repeats)
    return seconds, _rel(w, torch.from_numpy(tl.cp_to_tensor(cp)).reshape(w.shape))


def recovery(n_seeds: int) -> list[dict]:
    rows = []
    for kind in DECOMPOSITIONS:
        weights = [planted(kind, 24, 16, 5, seed) for seed in range(n_seeds)]
        configs = [(name, lambda w, p=p, k=kind: ours(k, w, 5, p)) for name, p in OURS.items()]
        configs.append(("tensorly", lambda w, k=kind: tensorly(k, w, 5)))
        configs.append(("tensorly defaults", lambda w, k=kind: tensorly(k, w, 5, defaults=True)))
        for name, fn in configs:
            results = [fn(w) for w in weights]
            times = [t for t, _ in results]
            errors = [e for _, e in results]
            row = {"kind": kind, "config": name, "seeds": n_seeds,
                   "recovered": sum(e < RECOVERED for e in errors),
                   "failed": [[s, e] for s, e in enumerate(errors) if e >= RECOVERED],
                   "mean_s": statistics.fmean(times), "max_s": max(times),
                   "median_error": statistics.median(errors), "max_error": max(errors)}
            rows.append(row)
            print(_recovery_row(row), flush=True)
    return rows


def shapes(channels: list[int], tensorly_max: int, repeats: int) -> list[dict]:
    rows = []
    for c in channels:
        conv = nn.Conv2d(c, c, 3, bias=False)
        for kind, dec in DECOMPOSITIONS.items():
            quarter = dec.full_rank(conv) // 4
            r4 = dec.rank_for_param_count(conv, conv.weight.numel() / 4.0)
            g = torch.Generator().manual_seed(c)
            cases = [
                ("random", quarter, torch.randn(c, c, 3, 3, generator=g) / (3 * c ** 0.5)),
                ("planted", quarter, planted(kind, c, c, quarter, seed=c)),
                ("planted 4x + 5% noise", r4,
                 add_noise(cp_weight((c, c, 3, 3), r4, seed=2 * c), 0.05, seed=2 * c + 1).float()),
            ]
            for data, rank, w in cases:
                row = {"kind": kind, "shape": [c, c, 3, 3], "data": data, "rank": rank}
                for name in TIMED:
                    row[name] = ours(kind, w, rank, OURS[name], repeats)
                row["tensorly"] = tensorly(kind, w, rank) if c <= tensorly_max else None
                rows.append(row)
                print(_shape_row(row), flush=True)
    return rows


RECOVERY_HEADER = ("| kind | config | recovered | mean s | max s | median error | max error "
                   "| failed seeds (error) |")
SHAPE_HEADER = ("| kind | shape | weight | rank | "
                + " | ".join(f"{n} s / error" for n in TIMED) + " | tensorly s / error |")


def _recovery_row(r: dict) -> str:
    failed = ", ".join(f"{s} ({e:.3f})" for s, e in r["failed"]) or "-"
    return (f"| {r['kind']} | {r['config']} | {r['recovered']}/{r['seeds']} | {r['mean_s']:.3f} "
            f"| {r['max_s']:.3f} | {r['median_error']:.1e} | {r['max_error']:.1e} | {failed} |")


def _pair(value) -> str:
    return "-" if value is None else f"{value[0]:.2f} / {value[1]:.5f}"


def _shape_row(r: dict) -> str:
    c = r["shape"][0]
    cells = " | ".join(_pair(r[n]) for n in TIMED)
    return (f"| {r['kind']} | {c}x{c}x3x3 | {r['data']} | {r['rank']} | {cells} "
            f"| {_pair(r['tensorly'])} |")


def _table(header: str, lines: list[str]) -> str:
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1)] + lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 seeds, 8 channels, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="directory for cp_als.json and cp_als.md")
    parser.add_argument("--seeds", type=int, default=50, help="planted rank-5 seeds")
    parser.add_argument("--channels", default="64,128", help="conv channels (in = out)")
    parser.add_argument("--tensorly-max-channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats (best of)")
    parser.add_argument("--skip-shapes", action="store_true",
                        help="only the recovery table (e.g. with --seeds 550)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n_seeds = 3 if args.smoke else args.seeds
    channels = [8] if args.smoke else [int(c) for c in args.channels.split(",")]
    started = time.perf_counter()
    print(RECOVERY_HEADER, flush=True)
    rec = recovery(n_seeds)
    print("\n" + SHAPE_HEADER, flush=True)
    per_layer = [] if args.skip_shapes else shapes(channels, args.tensorly_max_channels,
                                                   args.repeats)
    meta = {"torch": torch.__version__, "tensorly": tl.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "threads": 1, "smoke": args.smoke, "repeats": args.repeats,
            "seconds": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cp_als.json").write_text(json.dumps(
        {"meta": meta, "recovery": rec, "shapes": per_layer}, indent=2) + "\n")
    flags = [("--smoke", args.smoke), (f"--seeds {args.seeds}", args.seeds != 50),
             (f"--channels {args.channels}", args.channels != "64,128"),
             ("--skip-shapes", args.skip_shapes)]
    command = " ".join(["python docs/benchmarks/cp_als.py"] + [f for f, on in flags if on])
    md = ["# CP-ALS: swamps, restarts, time per layer", "",
          f"torch {meta['torch']}, tensorly {meta['tensorly']} (NumPy backend), one thread, "
          f"float32 weights; `{command}` ({meta['seconds']:.0f} s). `before` = "
          "`CPParams(restarts=0)` (the single-start ALS of issue 10), `after` = `CPParams()`, "
          "`fast` = `CPParams(tol=1e-4)`; tensorly = `parafac(init='svd', n_iter_max=500, "
          "linesearch=True)` on the float64 weight.", "",
          f"## Planted exact rank-5 CPs, 24x16x3x3 conv, seeds 0..{n_seeds - 1}", "",
          "Recovered: relative error below 1e-4. Times are per tensor.", "",
          _table(RECOVERY_HEADER, [_recovery_row(r) for r in rec]), "",
          "## Time per layer", "",
          "Rank 1/4 of the full rank for the random and planted weights; the rank of a 4x "
          "parameter reduction for the noisy low-rank one. Seconds / relative error.", "",
          _table(SHAPE_HEADER, [_shape_row(r) for r in per_layer]), ""]
    (args.out / "cp_als.md").write_text("\n".join(md))
    print(f"\nwrote {args.out / 'cp_als.json'} and .md ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
