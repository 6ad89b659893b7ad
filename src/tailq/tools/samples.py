"""Gradient samples from files (no pickle), and the Monte-Carlo MSE of a design on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tailq.errors import UsageError
from tailq.options import FLOAT32_MAX, FLOAT32_TINY

__all__ = ["load_samples", "monte_carlo_mse"]


def load_samples(path: str) -> np.ndarray:
    """Flattened gradient values from a ``.npy`` file or a ``.pt`` file of tensors (``weights_only=True``): finite,
    within float32's range, and (unless all zero) of a scale in float32's normal range; else :class:`UsageError`
    naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"samples file {path!r} does not exist (expected a .npy or .pt file of gradient values)"
        )
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as err:
            raise UsageError(f"{path}: cannot read as a plain .npy array without pickle ({err})") from err
        if arr.dtype.kind not in "fiu":  # complex, strings, booleans, structured: not gradient values
            raise UsageError(f"{path}: holds {arr.dtype} values; expected real numbers (a float or integer array)")
        arrays = [np.asarray(arr, dtype=np.float64).ravel()]
    elif suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad or unsafe files
            raise UsageError(f"{path}: cannot load with torch.load(weights_only=True): {err}") from err
        tensors = _collect_tensors(obj)
        if not tensors:
            raise UsageError(f"{path}: no floating-point tensors found")
        arrays = [t.detach().to(torch.float64).reshape(-1).numpy() for t in tensors]
    else:
        raise UsageError(f"samples file {path!r}: unsupported suffix {suffix!r}; accepted: .npy, .pt, .pth")
    x = np.concatenate(arrays) if arrays else np.zeros(0)
    if x.size == 0:
        raise UsageError(f"{path}: contains no values")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise UsageError(f"{path}: contains {bad} non-finite values (NaN/Inf) of {x.size}")
    # the codec computes in float32: values beyond its range, or a scale below its normal numbers, cannot be coded
    with np.errstate(over="ignore"):
        top, scale = float(np.max(np.abs(x))), float(np.mean(np.abs(x)))
    if top > FLOAT32_MAX:
        raise UsageError(f"{path}: values up to {top:.6g} are beyond float32's range (+-{FLOAT32_MAX:.6g}) that the "
                         "codec computes in; rescale them")
    if 0 < scale < FLOAT32_TINY:
        raise UsageError(f"{path}: mean |value| {scale:.6g} is below float32's normal range (>= {FLOAT32_TINY:.6g}) "
                         "that the codec computes in; rescale them")
    return x


def _collect_tensors(obj: Any) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _collect_tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _collect_tensors(v)]
    return []


def monte_carlo_mse(levels: np.ndarray, samples: np.ndarray, seed: int = 0) -> float:
    """Measured per-coordinate MSE of truncation + stochastic rounding onto ``levels`` (torch codec path)."""
    import torch

    from tailq.codec import Codebook

    uniform = bool(np.allclose(np.diff(levels), (levels[-1] - levels[0]) / (len(levels) - 1), rtol=1e-9))
    cb = Codebook.from_levels(levels, uniform=uniform)
    x = torch.as_tensor(samples, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    err = cb.decode(cb.encode(x, gen)).double() - x.double()
    return float((err * err).mean())
