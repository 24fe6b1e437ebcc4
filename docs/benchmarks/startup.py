"""Benchmark: start-up cost, measured in fresh processes (the first use in a process is what
a user waits for; later ones take milliseconds).

For each variant, in a new interpreter each time, with the variants interleaved:

- ``import musco_core``;
- the first registry load (``musco_core.default_registry().entries``: entry points, plugin
  imports, registration hooks);
- the first ``Compressor(...)`` on a tiny model (two Linear layers, ``svd`` at a fixed rank),
  then its first ``step()``;
- the wall time of ``python -m musco_core.cli plugins`` (``musco plugins``), interpreter
  start included;

and ``python -X importtime -c "import musco_core; musco_core.default_registry().entries"``:
how many modules load and the sum of the top-level cumulative import times it reports.

Variants: ``now`` is this checkout; ``before`` is ``musco_core`` and ``plugins`` as of
``--baseline`` (a git revision, default the commit before the lazy imports of issue 19),
extracted with ``git archive`` into a temporary directory and put first on ``PYTHONPATH``
(same interpreter and packages). Without git, or with ``--no-baseline``, only ``now`` runs.

    python docs/benchmarks/startup.py              # writes docs/benchmarks/results/startup.*
    python docs/benchmarks/startup.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"
#: The tree before plugin loading became lazy (scipy.optimize imported by musco_std.vbmf,
#: packages_distributions() scanned at every registry load).
BASELINE = "232754bd071ce9b3be59f3c66610dfaf660c0add"

#: Run in a fresh interpreter; prints the three in-process timings as JSON.
PROBE = r"""
import json, sys, time, warnings
t0 = time.perf_counter()
import musco_core as musco
t1 = time.perf_counter()
musco.default_registry().entries
t2 = time.perf_counter()
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))
spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                    rank=musco.RankRule("fixed", rank=8))])
t3 = time.perf_counter()
compressor = musco.Compressor(model, spec, torch.randn(2, 32))
t4 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    compressor.step()
t5 = time.perf_counter()
print(json.dumps({"import musco_core": t1 - t0, "first registry load": t2 - t1,
                  "first Compressor(...)": t4 - t3, "first step()": t5 - t4}))
"""

REGISTRY_ONLY = "import musco_core; musco_core.default_registry().entries"
HEAVY = ("scipy.optimize", "scipy", "tensorly", "sympy")


def variant_env(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "plugins")])
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
    return env


def extract(revision: str, into: Path) -> Path | None:
    """``musco_core`` and ``plugins`` at ``revision``, or ``None`` when git cannot give them."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "musco_core",
                                  "plugins"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline ({revision}): {exc}", file=sys.stderr)
        return None
    return into


def run_probe(env: dict[str, str], cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=cwd, capture_output=True,
                         text=True, check=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_cli(env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "musco_core.cli", "plugins"], env=env, cwd=cwd,
                   capture_output=True, check=True, timeout=600)
    return time.perf_counter() - start


def run_importtime(env: dict[str, str], cwd: Path) -> dict:
    """Modules loaded and the sum of top-level cumulative import times of a registry load."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", REGISTRY_ONLY], env=env,
                         cwd=cwd, capture_output=True, text=True, check=True, timeout=600).stderr
    total, names = 0, set()
    for line in err.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not match:
            continue
        names.add(match.group(4))
        if len(match.group(3)) == 1:  # a top-level import: its cumulative time counts once
            total += int(match.group(2))
    return {"modules": len(names), "total_s": total / 1e6,
            "heavy": sorted(n for n in HEAVY if n in names)}


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "runs": values}


def measure(variants: dict[str, dict[str, str]], repeats: int, cwd: Path) -> dict:
    timings: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    imports: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for name, env in variants.items():  # interleaved, so load changes hit both alike
            probe = run_probe(env, cwd)
            for key, value in probe.items():
                timings[name].setdefault(key, []).append(value)
            timings[name].setdefault("`musco plugins` (wall)", []).append(run_cli(env, cwd))
            imports[name].append(run_importtime(env, cwd))
    out = {}
    for name in variants:
        runs = imports[name]
        out[name] = {
            "timings": {key: summarize(values) for key, values in timings[name].items()},
            "importtime": {"modules": runs[0]["modules"],
                           "total_s": summarize([r["total_s"] for r in runs]),
                           "heavy": runs[0]["heavy"]},
        }
    return out


def markdown(result: dict) -> str:
    variants = list(result["variants"])
    header = "| measure | " + " | ".join(f"{v} (median s)" for v in variants)
    if len(variants) == 2:
        header += " | before / now"
    lines = [header + " |", "| --- " * (len(variants) + 1 + (len(variants) == 2)) + "|"]
    keys = list(result["variants"][variants[0]]["timings"])
    for key in keys:
        values = [result["variants"][v]["timings"][key]["median"] for v in variants]
        row = f"| {key} | " + " | ".join(f"{x:.3f}" for x in values)
        if len(values) == 2:
            row += f" | {values[1] / values[0]:.2f}x"
        lines.append(row + " |")
    values = [result["variants"][v]["importtime"]["total_s"]["median"] for v in variants]
    row = "| importtime total of a registry load | " + " | ".join(f"{x:.3f}" for x in values)
    if len(values) == 2:
        row += f" | {values[1] / values[0]:.2f}x"
    lines.append(row + " |")
    counts = [result["variants"][v]["importtime"]["modules"] for v in variants]
    lines.append("| modules imported by a registry load | "
                 + " | ".join(str(c) for c in counts) + (" | " if len(counts) == 2 else "")
                 + " |")
    heavy = [", ".join(result["variants"][v]["importtime"]["heavy"]) or "none" for v in variants]
    lines.append("| heavy modules a registry load imports | " + " | ".join(heavy)
                 + (" | " if len(heavy) == 2 else "") + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of 'before'")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="one repeat, no baseline")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cwd = tmp / "cwd"  # neither tree's directory: each variant finds only its own code
        cwd.mkdir()
        variants = {"now": variant_env(None)}
        if not (args.smoke or args.no_baseline):
            tree = extract(args.baseline, tmp / "before")
            if tree is not None:
                variants["before"] = variant_env(tree)
        measured = measure(variants, repeats, cwd)
    result = {
        "benchmark": "startup",
        "baseline": None if len(variants) == 1 else args.baseline,
        "repeats": repeats,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "variants": measured,
    }
    table = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "startup.md").write_text(
        "# Start-up: first use in a fresh process\n\n"
        f"Medians of {repeats} fresh processes per variant, interleaved; 'before' is "
        f"`musco_core` and `plugins` at {result['baseline'] or '(none)'}. "
        f"{result['cpus']} CPUs, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['load_average'] or [])}.\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
