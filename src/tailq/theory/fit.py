"""Fitting the tail models (SPEC §3.1, §3.2) from raw samples or from a merged :class:`LogHistogram`.

* Laplace: ``γ̂ = mean|g|`` (zero-location maximum likelihood).
* Power law: Clauset–Shalizi–Newman (CSN). For a candidate lower cut-off ``m``:
  ``γ̂ = 1 + n_tail / Σ_{|g_i| >= m} ln(|g_i|/m)``, and ``m`` minimises the Kolmogorov–Smirnov distance between
  the empirical CDF of the tail ``{|g| >= m}`` and the Pareto CDF ``1 − (x/m)^{1−γ̂}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .histogram import HIST_K, LogHistogram, _as_finite_1d, hist_edges
from .tails import LaplaceTail, PowerLawTail

__all__ = ["PowerLawFit", "fit_laplace", "fit_powerlaw", "laplace_from_hist", "fit_powerlaw_hist"]

# Above this many tail samples the KS distance of one candidate is evaluated at a regular subset of at most
# _KS_POINTS order statistics; between two evaluated order statistics both CDFs are monotone, so the
# reported distance is low by at most (stride / n_tail) <= 1/_KS_POINTS.
_KS_POINTS = 1 << 16


@dataclass(frozen=True)
class PowerLawFit:
    """Result of a CSN power-law fit of |g| (SPEC §3.2).

    ``m``: lower cut-off of the Pareto tail; ``gamma``: tail exponent of the density; ``ks``: KS distance of
    the tail fit at the chosen ``m``; ``n_tail``: samples with ``|g| >= m``; ``n``: all samples.
    """

    m: float
    gamma: float
    ks: float
    n_tail: float
    n: float

    @property
    def tail(self) -> PowerLawTail:
        """The flat-body model of SPEC §3.2 with this ``(m, γ)``."""
        return PowerLawTail(m=self.m, gamma=self.gamma)


def _check_samples(x: ArrayLike) -> NDArray[np.float64]:
    arr = _as_finite_1d(x, "x")
    if arr.size == 0:
        raise ValueError("`x` is empty: need at least one sample to fit a tail")
    return arr


def fit_laplace(x: ArrayLike) -> LaplaceTail:
    """Laplace fit (SPEC §3.1): ``γ̂ = mean|x|``, the MLE of the scale of a zero-location Laplace."""
    arr = _check_samples(x)
    scale = float(np.mean(np.abs(arr)))
    if scale == 0.0:
        raise ValueError(
            f"`x` is all zeros ({arr.size} values): no tail to fit (an all-zero gradient is "
            "handled by the codec as zero in -> zero out)"
        )
    return LaplaceTail(scale=scale)


def laplace_from_hist(h: LogHistogram) -> LaplaceTail:
    """Laplace fit from merged statistics: ``γ̂ = Σ|g| / n`` (exact, SPEC §3.1, §6)."""
    if h.n <= 0:
        raise ValueError("histogram `h` is empty (n = 0): no tail to fit")
    scale = h.mean_abs
    if scale == 0.0:
        raise ValueError(
            "histogram `h` holds only zeros: no tail to fit (the codec maps zero in -> zero out)"
        )
    return LaplaceTail(scale=scale)


def _default_tail_fractions() -> NDArray[np.float64]:
    # 50 candidate cut-offs: tail fractions P(|g| >= m) from 0.5 down to 0.001 (50th .. 99.9th percentile),
    # geometrically spaced so that the far tail is resolved as well as the shoulder (our choice).
    return np.geomspace(0.5, 0.001, 50)


def fit_powerlaw(x: ArrayLike, *, quantiles: ArrayLike | None = None, min_tail: int = 50) -> PowerLawFit:
    """CSN power-law fit on raw samples (SPEC §3.2).

    Candidates ``m``: the given ``quantiles`` of |x| (default: 50 quantiles from the 50th to the 99.9th
    percentile, geometric in the tail fraction); candidates with fewer than ``min_tail`` samples ``>= m`` or
    ``m = 0`` are skipped. For each, ``γ̂ = 1 + n_tail/Σ ln(|x|/m)`` and the KS distance
    ``max |F_emp − (1 − (x/m)^{1−γ̂})|`` over the tail; the candidate with the smallest KS wins.

    O(n log n): one sort, reverse cumulative sums of ``ln|x|``; the KS distance is exact for tails of at
    most 65536 samples and otherwise evaluated on 65536 regularly spaced order statistics (error <= 2^-16).
    """
    arr = _check_samples(x)
    min_tail = int(min_tail)
    if min_tail < 2:
        raise ValueError(f"`min_tail` must be >= 2, got {min_tail}")
    a = np.sort(np.abs(arr))
    n = a.size
    pos = a[a > 0]
    if pos.size == 0:
        raise ValueError(f"`x` is all zeros ({n} values): no tail to fit")
    if pos.size < min_tail:
        raise ValueError(
            f"`x` has only {pos.size} non-zero values; the power-law fit needs >= min_tail="
            f"{min_tail} tail samples"
        )
    if quantiles is None:
        qs = 1.0 - _default_tail_fractions()
    else:
        qs = np.asarray(quantiles, dtype=np.float64).reshape(-1)
        if qs.size == 0 or np.any((qs < 0) | (qs >= 1)) or not np.isfinite(qs).all():
            raise ValueError("`quantiles` must be a non-empty list of numbers in [0, 1)")
    # reference for logs so that the cumulative sums stay small: ln(|x|/ref)
    ref = float(pos[pos.size // 2])
    lg = np.log(pos / ref)
    # suffix sums: suf[i] = Σ_{j >= i} lg[j], accumulated from the largest values down
    suf = np.concatenate([np.cumsum(lg[::-1])[::-1], [0.0]])

    best: PowerLawFit | None = None
    seen: set[float] = set()
    for q in qs:
        m = float(a[min(int(np.floor(q * n)), n - 1)])
        if m <= 0 or m in seen:
            continue
        seen.add(m)
        i0 = int(np.searchsorted(pos, m, side="left"))  # first positive index with |x| >= m
        nt = pos.size - i0
        if nt < min_tail:
            continue
        s_log = suf[i0] - nt * np.log(m / ref)
        if not s_log > 0:
            continue
        gam = 1.0 + nt / s_log
        ks = _ks_tail(pos[i0:], m, gam)
        if best is None or ks < best.ks:
            best = PowerLawFit(m=m, gamma=float(gam), ks=float(ks), n_tail=float(nt), n=float(n))
    if best is None:
        raise ValueError(f"no candidate cut-off m leaves >= min_tail={min_tail} distinct tail samples of `x`")
    return best


def _ks_tail(t: NDArray[np.float64], m: float, gam: float) -> float:
    """KS distance between the empirical CDF of sorted tail samples ``t`` (all >= m) and the Pareto CDF."""
    nt = t.size
    if nt > _KS_POINTS:
        idx = np.unique(np.linspace(0, nt - 1, _KS_POINTS).astype(np.int64))
    else:
        idx = np.arange(nt)
    f = -np.expm1((1.0 - gam) * np.log(t[idx] / m))  # Pareto CDF 1 − (t/m)^{1−γ}
    after = (idx + 1.0) / nt
    before = idx / nt
    return float(max(np.max(after - f), np.max(f - before)))


def fit_powerlaw_hist(h: LogHistogram, min_tail: int = 50) -> PowerLawFit:
    """CSN on a merged histogram (SPEC §3.2, §3.4) — exact given the statistics, no raw samples needed.

    Candidates ``m`` are bin lower edges ``e_{j−1}`` (bin ``j``) from the bin holding the median of |g|
    upwards, with ``n_tail = Σ_{i >= j} counts_i >= min_tail`` and at least one bin edge above ``m`` to test.
    ``Σ_{|g| >= m} ln(|g|/m) = Σ_{i >= j} sum_log_i − n_tail·ln m`` and ``γ̂ = 1 + n_tail/that``.
    The KS distance
    is measured at the upper edges of bins ``j..K``: ``|F_emp(e) − (1 − (e/m)^{1−γ̂})|``.
    """
    if not isinstance(h, LogHistogram):
        raise TypeError(f"`h` must be a LogHistogram, got {type(h).__name__}")
    min_tail = int(min_tail)
    if min_tail < 2:
        raise ValueError(f"`min_tail` must be >= 2, got {min_tail}")
    n = h.n
    if n <= 0:
        raise ValueError("histogram `h` is empty (n = 0): no tail to fit")
    counts = h.counts
    if counts[0] >= n:
        raise ValueError("histogram `h` holds only (near-)zeros: no tail to fit")
    edges = hist_edges()
    # n_tail[j] = Σ_{i >= j} counts[i], sumlog_tail[j] likewise, j = 0..K+1
    n_tail = np.cumsum(counts[::-1])[::-1]
    sl_tail = np.cumsum(h.sum_log[::-1])[::-1]
    cum = np.cumsum(counts)
    j_med = max(int(np.searchsorted(cum, 0.5 * n, side="left")), 1)  # bin holding the median sample
    js = np.arange(max(j_med, 1), HIST_K + 1)  # bins 1..K (the overflow bin has no edge above it to test)
    js = js[n_tail[js] >= min_tail]
    if js.size == 0:
        raise ValueError(f"histogram `h` has no candidate cut-off with >= min_tail={min_tail} tail samples")
    m = edges[js - 1]
    nt = n_tail[js]
    s_log = sl_tail[js] - nt * np.log(m)
    ok = s_log > 0
    js, m, nt, s_log = js[ok], m[ok], nt[ok], s_log[ok]
    if js.size == 0:
        raise ValueError("histogram `h`: every candidate tail has zero log-spread; cannot fit a power law")
    gam = 1.0 + nt / s_log
    # KS at upper edges e_i, i = j..K  (matrix over candidates x edges, masked below the candidate)
    i = np.arange(1, HIST_K + 1)
    upper = edges[i]  # upper edge of bin i
    cum_counts = np.cumsum(counts[1 : HIST_K + 1])  # Σ_{1..i} counts
    below_j = np.concatenate([[0.0], cum_counts])[js - 1]  # Σ_{1..j-1}
    f_emp = (cum_counts[None, :] - below_j[:, None]) / nt[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        f_par = -np.expm1((1.0 - gam[:, None]) * np.log(upper[None, :] / m[:, None]))
    mask = i[None, :] >= js[:, None]
    d = np.where(mask, np.abs(f_emp - f_par), 0.0)
    ks = d.max(axis=1)
    b = int(np.argmin(ks))
    return PowerLawFit(m=float(m[b]), gamma=float(gam[b]), ks=float(ks[b]), n_tail=float(nt[b]), n=float(n))
