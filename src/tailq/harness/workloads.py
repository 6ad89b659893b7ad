"""Workloads: a dataset and a model preset each, all runnable offline.

* ``digits`` — scikit-learn's bundled 8×8 digits (1797 images, no download), an MLP wide enough that gradient
  communication is a large share of a step. The embedded default.
* ``charlm`` — a small character-level transformer trained on the text of Python's own standard library
  (``.py`` files under ``sysconfig.get_paths()["stdlib"]``): real text, no download. Metric: next-character
  accuracy on held-out files.
* ``synthetic`` — Gaussian-mixture classification whose inputs are Student-t with ``tail_df`` degrees of freedom:
  heavier input tails give heavier-tailed gradients. For tests.
* ``mnist`` — MNIST IDX files (``train-images-idx3-ubyte`` …, optionally ``.gz``) from ``--data-dir``; LeNet-5.
* ``cifar10`` — CIFAR-10 *binary* batches (``data_batch_1.bin`` … ``test_batch.bin``, no pickle) from
  ``--data-dir``; ResNet-18 for 32×32 inputs.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import struct
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tailq.errors import UsageError

__all__ = ["DEFAULT_STEPS", "DataError", "WORKLOADS", "Workload", "check_data", "load_workload"]


class DataError(UsageError):
    """Missing or malformed data files; the message names the files expected."""


@dataclasses.dataclass
class Workload:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: Callable[[], nn.Module]
    optimizer: str  # "sgd" | "adamw"
    lr: float
    batch_size: int  # per worker
    note: str = ""
    sequence: bool = False  # charlm: targets are per position

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.sequence:
            return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return nn.functional.cross_entropy(out, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: int = 1024) -> tuple[float, float]:
        """(accuracy, mean loss) on the full test split."""
        model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        for i in range(0, len(self.x_test), batch):
            xb, yb = self.x_test[i : i + batch], self.y_test[i : i + batch]
            out = model(xb)
            loss_sum += float(self.loss(out, yb)) * yb.numel()
            correct += int((out.argmax(-1) == yb).sum())
            total += yb.numel()
        model.train()
        return correct / total, loss_sum / total


# ---------------------------------------------------------------------------------------------------------
# models
def mlp(d_in: int, width: int, depth: int, classes: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, classes))
        return nn.Sequential(nn.Flatten(), *layers)

    return make


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                  nn.Linear(84, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (3×3 stem, no max-pool), as commonly used for CIFAR-10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class CharTransformer(nn.Module):
    """A small decoder-only transformer over bytes (pre-norm, learned positions, causal mask)."""

    def __init__(self, vocab: int = 256, d: int = 128, heads: int = 4, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        mask: torch.Tensor = self.mask  # type: ignore[assignment]
        h = self.blocks(h, mask=mask[:t, :t], is_causal=True)
        return self.out(self.norm(h))


# ---------------------------------------------------------------------------------------------------------
# datasets
def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def digits(seed: int = 0, **_: Any) -> Workload:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    xtr, ytr, xte, yte = _split(x, y, 0.2, seed)
    return Workload("digits", xtr, ytr, xte, yte, mlp(64, 512, 2, 10), "sgd", 0.05, 32,
                    note="scikit-learn digits (1797 8x8 images), MLP 64-512-512-10 (300k parameters)")


def synthetic(seed: int = 0, tail_df: float = 3.0, n: int = 8192, d: int = 128, classes: int = 10,
              **_: Any) -> Workload:
    if isinstance(tail_df, bool) or not isinstance(tail_df, int | float) or not (math.isfinite(tail_df)
                                                                                  and tail_df > 2):
        raise ValueError(f"tail_df must be a finite number > 2 (finite variance); got {tail_df!r}")
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, d))
    y = rng.integers(0, classes, n)
    noise = rng.standard_t(tail_df, (n, d)) * math.sqrt((tail_df - 2) / tail_df)
    x = torch.tensor(centers[y] * 0.6 + noise, dtype=torch.float32)
    xtr, ytr, xte, yte = _split(x, torch.tensor(y), 0.2, seed)
    return Workload("synthetic", xtr, ytr, xte, yte, mlp(d, 256, 2, classes), "sgd", 0.05, 32,
                    note=f"synthetic {classes}-class mixture, Student-t({tail_df}) inputs, MLP {d}-256-256-{classes}")


def stdlib_text(max_bytes: int = 4_000_000) -> bytes:
    """The standard library's .py sources, sorted by path, concatenated (deterministic for a Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if size == 0:
        raise DataError(f"no .py files under the standard library directory {root}")
    return b"".join(out)[:max_bytes]


def charlm(seed: int = 0, context: int = 64, max_bytes: int = 2_000_000, **_: Any) -> Workload:
    text = np.frombuffer(stdlib_text(max_bytes), dtype=np.uint8).astype(np.int64)
    n_seq = (len(text) - 1) // context
    x = torch.from_numpy(text[: n_seq * context].reshape(n_seq, context).copy())
    y = torch.from_numpy(text[1 : n_seq * context + 1].reshape(n_seq, context).copy())
    cut = int(n_seq * 0.9)  # held-out: the last 10% of the text (other files), not a random split
    test = slice(cut, min(n_seq, cut + 512))
    return Workload("charlm", x[:cut], y[:cut], x[test], y[test],
                    lambda: CharTransformer(context=context), "adamw", 2e-3, 16, sequence=True,
                    note=f"char-level transformer (2 layers, d=128) on {len(text) // 1000} kB of Python stdlib source")


# -- MNIST (IDX) and CIFAR-10 (binary batches) from a local directory ---------------------------------------
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)


def _find(data_dir: Path, name: str) -> Path | None:
    for cand in (data_dir / name, data_dir / (name + ".gz"), data_dir / "MNIST" / "raw" / name,
                 data_dir / "cifar-10-batches-bin" / name):
        if cand.is_file():
            return cand
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: magic, dims, big-endian sizes, then the raw array), optionally gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: MNIST is usually distributed gzipped
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    codes: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype = codes.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    arr = np.frombuffer(raw, dtype=np.dtype(dtype), offset=4 + 4 * ndim)
    if arr.size != math.prod(dims):
        raise DataError(f"{path}: IDX header says {dims} ({math.prod(dims)} values) but holds {arr.size}")
    return arr.reshape(dims)


def mnist(data_dir: str | None = None, **_: Any) -> Workload:
    d = Path(data_dir or "data/mnist")
    found = {n: _find(d, n) for n in MNIST_FILES}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise DataError(f"MNIST: missing {', '.join(missing)} (or .gz) in {d}; expected the four IDX files "
                        f"{', '.join(MNIST_FILES)} — pass --data-dir")
    paths = {n: p for n, p in found.items() if p is not None}
    xtr = torch.from_numpy(read_idx(paths[MNIST_FILES[0]]).astype(np.float32) / 255.0).unsqueeze(1)
    ytr = torch.from_numpy(read_idx(paths[MNIST_FILES[1]]).astype(np.int64))
    xte = torch.from_numpy(read_idx(paths[MNIST_FILES[2]]).astype(np.float32) / 255.0).unsqueeze(1)
    yte = torch.from_numpy(read_idx(paths[MNIST_FILES[3]]).astype(np.int64))
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"MNIST in {d}: image and label counts differ")
    mean, std = 0.1307, 0.3081
    return Workload("mnist", (xtr - mean) / std, ytr, (xte - mean) / std, yte, LeNet5, "sgd", 0.05, 32,
                    note="MNIST (IDX files), LeNet-5")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32×32)."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size % 3073:
        raise DataError(f"{path}: size {raw.size} is not a multiple of 3073 (1 label + 3072 pixels)")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def cifar10(data_dir: str | None = None, **_: Any) -> Workload:
    d = Path(data_dir or "data/cifar10")
    found = {n: _find(d, n) for n in CIFAR_FILES}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise DataError(f"CIFAR-10: missing {', '.join(missing)} in {d}; expected the binary version's files "
                        f"{', '.join(CIFAR_FILES)} (cifar-10-binary.tar.gz, not the Python pickles) — pass --data-dir")
    paths = {n: p for n, p in found.items() if p is not None}
    train = [read_cifar_batch(paths[n]) for n in CIFAR_FILES[:5]]
    xte_np, yte_np = read_cifar_batch(paths["test_batch.bin"])
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def prep(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a.astype(np.float32) / 255.0) - mean) / std

    xtr = prep(np.concatenate([t[0] for t in train]))
    ytr = torch.from_numpy(np.concatenate([t[1] for t in train]))
    return Workload("cifar10", xtr, ytr, prep(xte_np), torch.from_numpy(yte_np), ResNet18, "sgd", 0.05, 32,
                    note="CIFAR-10 (binary batches), ResNet-18")


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "digits": digits,
    "charlm": charlm,
    "synthetic": synthetic,
    "mnist": mnist,
    "cifar10": cifar10,
}


DEFAULT_STEPS = {"digits": (300, 25), "charlm": (400, 50), "synthetic": (200, 20), "mnist": (600, 50),
                 "cifar10": (2000, 200)}
"""Per workload: (steps, evaluate every) of ``tailq train`` and ``tailq compare`` when not given."""


def load_workload(name: str, **kwargs: Any) -> Workload:
    if name not in WORKLOADS:
        raise UsageError(f"--workload must be one of {', '.join(WORKLOADS)}; got {name!r}")
    return WORKLOADS[name](**kwargs)


def check_data(workload: str, data_dir: str | None) -> None:
    """Before anything starts: the data files of a workload that reads them exist (``DataError`` naming them)."""
    if workload in ("mnist", "cifar10"):
        load_workload(workload, data_dir=data_dir)
