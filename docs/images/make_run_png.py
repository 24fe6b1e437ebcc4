"""Draws docs/images/run.png: the small Fashion-MNIST VGG of the benchmarks, trained briefly and
compressed in two rounds (Tucker-2 on 3x3 convs, SVD on the Linear layer), one layer per step.

    python docs/images/make_run_png.py [--data DIR]

Uses Fashion-MNIST when found (see docs/benchmarks/_common.py), else its synthetic stand-in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))

import _common as common  # noqa: E402

import musco_core as musco  # noqa: E402

SPEC = musco.Spec.from_toml("""
rounds = 2
layers_per_step = 1
exclude = ["features.conv1", "classifier.fc2"]

[[rules]]
match = "conv_kxk"
decomposition = "tucker2"
rank = { name = "param_reduction", rate = 1.6 }

[[rules]]
match = "linear"
decomposition = "svd"
rank = { name = "param_reduction", rate = 2.5 }
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None)
    parser.add_argument("-o", "--output", default=str(HERE / "run.png"))
    args = parser.parse_args()
    torch.manual_seed(0)
    root = common.fashion_mnist_dir(args.data)
    if root is not None:
        x, y, _, _ = common.load_fashion_mnist(root, limit=2000)
        source = "Fashion-MNIST"
    else:
        print(common.FASHION_HINT, file=sys.stderr)
        x, y, _, _ = common.synthetic_images(2000, 10)
        source = "synthetic Fashion-MNIST stand-in"
    model = common.small_vgg()
    common.train(model, x, y, steps=60, batch=64)
    compressor = musco.Compressor(model, SPEC, example_inputs=x[:1])
    while not compressor.done:
        compressor.step()
        common.train(compressor.model, x, y, steps=10, batch=64, lr=5e-4, schedule=False)
    run = compressor.report()
    print(run)
    run.plot(args.output)
    print(f"{args.output} ({source})")


if __name__ == "__main__":
    main()
