"""Walkthrough: compress a Fashion-MNIST CNN in stages, fine-tuning between steps, then reload it.

    python docs/examples/cnn_walkthrough.py            # Fashion-MNIST (apt-get install dataset-fashion-mnist)
    python docs/examples/cnn_walkthrough.py --smoke    # tiny, seconds; synthetic data if missing

Steps: (1) data, (2) a trained model (trained here once, then loaded from a cache),
(3) a spec, (4) the multi-stage loop: compress a few layers, fine-tune, save, repeat,
(5) the result, (6) reload the compressed model from the state file.
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import musco_core as musco

FASHION = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path(__file__).resolve().parents[1] / "benchmarks" / ".cache"  # gitignored


# (1) Data ------------------------------------------------------------------------------------

def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (raw or .gz) as a uint8 tensor."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load_data(smoke: bool):
    files = {k: FASHION / f"{k}-ubyte.gz" for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    if all(p.is_file() for p in files.values()):
        n = 256 if smoke else None
        x, y, xt, yt = (read_idx(p)[:n] for p in files.values())
        return x.unsqueeze(1).float() / 255, y.long(), xt.unsqueeze(1).float() / 255, yt.long()
    print("Fashion-MNIST not found: `apt-get install dataset-fashion-mnist`; "
          "using synthetic images")
    g = torch.Generator().manual_seed(0)
    templates = F.interpolate(torch.rand(10, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear")
    y = torch.randint(0, 10, (768,), generator=g)
    x = (templates[y] + 0.25 * torch.randn(768, 1, 28, 28, generator=g)).clamp(0, 1)
    return x[:512], y[:512], x[512:], y[512:]


# (2) Model and training ----------------------------------------------------------------------

def make_model() -> nn.Module:
    """The original architecture. load_compressed rebuilds the compressed model on a fresh one."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def fine_tune(model: nn.Module, x, y, steps: int, lr: float = 1e-3, seed: int = 0,
              batch: int = 128) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return 100.0 * sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                       for i in range(0, len(x), 1000)) / len(x)


def trained_model(x, y, smoke: bool) -> nn.Module:
    model = make_model()
    cache = CACHE / "walkthrough_cnn.pt"
    if not smoke and cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    fine_tune(model, x, y, steps=10 if smoke else 250, lr=3e-3, batch=32 if smoke else 128)
    if not smoke:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model


# (3) The spec --------------------------------------------------------------------------------

SPEC = """
exclude = ["0", "17"]        # the first conv (1 input channel) and the classifier
layers_per_step = 2          # compress two layers, fine-tune, the next two ...
rounds = 2                   # ... then compress every factorized layer once more

[[rules]]
match = "conv_kxk"
decomposition = "tucker2"
rank = { name = "param_reduction", rate = 2.0 }   # per round: about 4x over both

[[rules]]
match = "linear"
decomposition = "svd"
rank = { name = "param_reduction", rate = 2.0 }
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(CACHE / "cnn_walkthrough"),
                        help="where the state file goes")
    parser.add_argument("--ft-steps", type=int, default=40, help="fine-tuning steps per step")
    args = parser.parse_args(argv)
    ft_steps = 2 if args.smoke else args.ft_steps
    torch.set_num_threads(1 if args.smoke else 2)

    x, y, x_test, y_test = load_data(args.smoke)
    model = trained_model(x, y, args.smoke)
    print(f"original: {accuracy(model, x_test, y_test):.2f}% test accuracy")

    spec = musco.Spec.from_toml(SPEC)
    compressor = musco.Compressor(model, spec, example_inputs=x_test[:1])
    print(compressor.plan)

    # (4) The multi-stage loop: compress, fine-tune, save.
    state = Path(args.out) / "cnn.musco"
    while not compressor.done:
        report = compressor.step()
        print(report)
        print(f"  after the step: {accuracy(compressor.model, x_test, y_test):.2f}%")
        fine_tune(compressor.model, x, y, steps=ft_steps, seed=compressor.position,
                  batch=32 if args.smoke else 128)
        print(f"  after fine-tuning: {accuracy(compressor.model, x_test, y_test):.2f}%")
        compressor.save(state)          # a killed run resumes with Compressor.resume(state, ...)

    # (5) The result.
    done = [r for step in compressor.reports for r in step.compressed]
    first = {r.name: r for r in reversed(done)}          # each layer's first compression
    last = {r.name: r for r in done}                     # ... and its last
    params = sum(first[n].params_before for n in first), sum(last[n].params_after for n in last)
    flops = sum(first[n].flops_before for n in first), sum(last[n].flops_after for n in last)
    acc = accuracy(compressor.model, x_test, y_test)
    print(f"compressed layers: {params[0] / params[1]:.2f}x fewer parameters, "
          f"{flops[0] / flops[1]:.2f}x fewer FLOPs; {acc:.2f}% test accuracy")

    # (6) Reload: a fresh original model plus the state file give the compressed model.
    reloaded = musco.load_compressed(make_model(), state).eval()
    with torch.no_grad():
        same = torch.allclose(reloaded(x_test[:64]), compressor.model(x_test[:64]), atol=1e-5)
    print(f"reloaded from {state}: outputs identical: {same}")
    assert same
    return {"accuracy": acc, "param_ratio": params[0] / params[1],
            "flop_ratio": flops[0] / flops[1], "state": str(state)}


if __name__ == "__main__":
    main()
