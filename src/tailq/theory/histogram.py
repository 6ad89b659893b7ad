"""Mergeable log-spaced histogram of |g| (SPEC §3.4, §6 "Agreeing on the codebook").

Layout (a contract shared with :mod:`tailq.codec.stats`, which computes the same statistics with torch and
all-reduces them with SUM):

* ``HIST_LO = 2**-40``, ``HIST_HI = 2**16``, ``HIST_BINS_PER_OCTAVE = 4``, ``HIST_K = 224`` log bins.
* Bin 0 is the *zero bin*: ``|g| < HIST_LO`` (exact zeros included).
* Bins ``1..K`` are ``[LO·2^((i−1)/4), LO·2^(i/4))``.
* Bin ``K+1`` is the *overflow bin*: ``|g| >= HIST_HI``.
* Bin index for ``|g| >= LO``: ``floor(4·(log2|g| − log2 LO)) + 1``, clipped to ``[1, K+1]``.
* Statistics vector (float64, length ``HIST_STATS_LEN = 3·HIST_NBINS``):
  ``[counts(226), sum_abs(226), sum_log(226)]`` — per bin the count, ``Σ|g|`` and ``Σ ln|g|``
  (the zero bin's ``sum_log`` is always 0).

Histograms add: summing two statistics vectors is exactly merging the two histograms, so workers can agree
on one histogram with a plain all-reduce. Near a bin edge the index computed in float64 here and the one
computed by another implementation may differ by one bin; that changes nothing downstream (every consumer
only uses the summed statistics).

**Octave shift (scale-free binning).** The bins span 56 octaves; a bucket far outside them (max|g| < 2^-16,
where most magnitudes fall in the zero bin, or max|g| >= 2^16, the overflow bin) is binned as |g|·2^-s for an
integer shift s known to every rank, and the design made on those units is scaled back by 2^s (exact for
powers of two). :func:`hist_in_range` says whether a histogram represents its samples (max|g| in
[``HIST_FIT_LO``, ``HIST_HI``)); :func:`hist_shift` gives the shift to bin the next samples like these with.
s = 0 is today's binning, and the shift stays 0 for every bucket whose max|g| lies in [2^-12, 2^12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "HIST_LO",
    "HIST_HI",
    "HIST_BINS_PER_OCTAVE",
    "HIST_K",
    "HIST_NBINS",
    "HIST_STATS_LEN",
    "LogHistogram",
    "hist_edges",
    "hist_bin_index",
    "HIST_FIT_LO",
    "hist_in_range",
    "hist_shift",
]

HIST_LO: float = 2.0**-40
HIST_HI: float = 2.0**16
HIST_BINS_PER_OCTAVE: int = 4
HIST_K: int = HIST_BINS_PER_OCTAVE * 56  # 224 log bins between LO and HI
HIST_NBINS: int = HIST_K + 2  # + zero bin + overflow bin = 226
HIST_STATS_LEN: int = 3 * HIST_NBINS

_LOG2_LO = math.log2(HIST_LO)
_LN2 = math.log(2.0)

HIST_FIT_LO: float = 2.0**-16
"""The bins represent a bucket whose max|g| lies in [HIST_FIT_LO, HIST_HI): no overflow, and 24 octaves of log
bins below the largest magnitude (what falls in the zero bin is then below 2^-24·max|g|)."""
_FIT_FIRST = HIST_BINS_PER_OCTAVE * 24 + 1  # the first bin at or above HIST_FIT_LO = LO·2^24
_KEEP = (HIST_BINS_PER_OCTAVE * 28 + 1, HIST_BINS_PER_OCTAVE * 52)  # the bins of [2^-12, 2^12): keep the shift
_KEEP_OCTAVES = 12  # a shift is 0 whenever max|g| lies in [2^-KEEP, 2^KEEP)
_LOOSE_TOP = 12  # an upper bound on max|g| (overflow or zero bin) is put in [2^12, 2^13) by the new shift


def hist_edges() -> NDArray[np.float64]:
    """The ``K + 1`` log-bin edges ``LO·2^(i/4)``, ``i = 0..K`` (``edges[0] = LO``, ``edges[-1] = HI``).

    Bin ``i`` (``1 <= i <= K``) is ``[edges[i−1], edges[i])`` (SPEC §3.4). Powers of two are exact.
    """
    i = np.arange(HIST_K + 1, dtype=np.float64)
    return np.ldexp(
        np.exp2(np.mod(i, HIST_BINS_PER_OCTAVE) / HIST_BINS_PER_OCTAVE),
        (i // HIST_BINS_PER_OCTAVE).astype(np.int64) + int(_LOG2_LO),
    )


def hist_bin_index(a: ArrayLike) -> NDArray[np.int64]:
    """Bin index of each magnitude ``a = |g|``: 0 if ``a < LO``, else ``floor(4·log2(a/LO)) + 1`` clipped to
    ``[1, K+1]`` (``K+1`` = overflow, ``a >= HI``). Computed in float64. NaN has no bin (ValueError)."""
    arr = np.abs(np.asarray(a, dtype=np.float64))
    if np.isnan(arr).any():
        raise ValueError("hist_bin_index: `a` contains NaN, which has no bin")
    nonzero = arr >= HIST_LO
    la = np.log2(np.where(nonzero, arr, HIST_LO))
    raw = np.floor((la - _LOG2_LO) * HIST_BINS_PER_OCTAVE) + 1.0
    idx = np.clip(raw, 1.0, float(HIST_K + 1)).astype(np.int64)
    return np.where(nonzero, idx, 0).astype(np.int64)


def _as_finite_1d(x: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise ValueError(f"`{name}` must be finite: found {n_nan} NaN and {n_inf} Inf of {arr.size} values")
    return arr


@dataclass(frozen=True, eq=False)
class LogHistogram:
    """Histogram of |g| on the fixed log bins of SPEC §3.4: per-bin ``counts``, ``sum_abs`` (Σ|g|) and
    ``sum_log`` (Σ ln|g|), each a float64 array of length ``HIST_NBINS``.

    Mergeable: ``h1 + h2`` (or ``h1.merge(h2)``) equals the histogram of the concatenated samples, and
    ``to_stats()`` of the merge is the sum of the two statistics vectors.
    """

    counts: NDArray[np.float64]
    sum_abs: NDArray[np.float64]
    sum_log: NDArray[np.float64]

    def __post_init__(self) -> None:
        for name in ("counts", "sum_abs", "sum_log"):
            arr = np.array(getattr(self, name), dtype=np.float64, copy=True).reshape(-1)
            if arr.shape != (HIST_NBINS,):
                raise ValueError(
                    f"LogHistogram.{name} must have length HIST_NBINS={HIST_NBINS}, got {arr.size}"
                )
            if not np.isfinite(arr).all():
                raise ValueError(f"LogHistogram.{name} must be finite")
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        if (self.counts < 0).any():
            bad = np.flatnonzero(self.counts < 0)
            raise ValueError(f"LogHistogram.counts must be >= 0; negative in bins {bad[:10].tolist()}")
        if (self.sum_abs < 0).any():
            raise ValueError("LogHistogram.sum_abs must be >= 0 (it is a sum of magnitudes)")
        if self.sum_log[0] != 0.0:
            raise ValueError(
                f"LogHistogram.sum_log[0] (zero bin) must be 0 by the layout contract, "
                f"got {self.sum_log[0]!r}"
            )
        empty = self.counts == 0
        if (self.sum_abs[empty] != 0).any():
            raise ValueError("LogHistogram: a bin with count 0 has a non-zero sum_abs (corrupt statistics)")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def empty(cls) -> LogHistogram:
        """The histogram of no samples (the identity of ``merge``)."""
        z = np.zeros(HIST_NBINS)
        return cls(z, z, z)

    @classmethod
    def from_samples(cls, x: ArrayLike) -> LogHistogram:
        """Histogram of ``|x|`` (any shape; NaN/Inf rejected with a ValueError naming ``x``)."""
        arr = _as_finite_1d(x, "x")
        a = np.abs(arr)
        idx = hist_bin_index(a)
        nonzero = idx > 0
        ln_a = np.where(nonzero, np.log2(np.where(nonzero, a, 1.0)) * _LN2, 0.0)
        counts = np.bincount(idx, minlength=HIST_NBINS).astype(np.float64)
        sum_abs = np.asarray(np.bincount(idx, weights=a, minlength=HIST_NBINS), dtype=np.float64)
        sum_log = np.asarray(np.bincount(idx, weights=ln_a, minlength=HIST_NBINS), dtype=np.float64)
        sum_log[0] = 0.0
        return cls(counts, sum_abs, sum_log)

    @classmethod
    def from_stats(cls, vec: ArrayLike) -> LogHistogram:
        """Inverse of :meth:`to_stats`: ``vec = [counts, sum_abs, sum_log]`` (length ``HIST_STATS_LEN``)."""
        arr = np.asarray(vec, dtype=np.float64).reshape(-1)
        if arr.size != HIST_STATS_LEN:
            raise ValueError(
                f"stats vector must have length HIST_STATS_LEN={HIST_STATS_LEN} "
                f"(3 x {HIST_NBINS} bins: counts, sum_abs, sum_log), got {arr.size}"
            )
        if not np.isfinite(arr).all():
            raise ValueError("stats vector must be finite (found NaN/Inf)")
        n = HIST_NBINS
        return cls(arr[:n], arr[n : 2 * n], arr[2 * n :])

    def to_stats(self) -> NDArray[np.float64]:
        """``[counts, sum_abs, sum_log]`` as one float64 vector of length ``HIST_STATS_LEN``."""
        return np.concatenate([self.counts, self.sum_abs, self.sum_log])

    def merge(self, other: LogHistogram) -> LogHistogram:
        """Histogram of the union of both sample sets (element-wise sum of the statistics)."""
        if not isinstance(other, LogHistogram):
            raise TypeError(f"can only merge a LogHistogram, got {type(other).__name__}")
        return LogHistogram(
            self.counts + other.counts, self.sum_abs + other.sum_abs, self.sum_log + other.sum_log
        )

    def __add__(self, other: LogHistogram) -> LogHistogram:
        return self.merge(other)

    # -- summaries ---------------------------------------------------------------------------------
    @property
    def n(self) -> float:
        """Number of samples (float: the statistics are float64 so that they can be all-reduced)."""
        return float(self.counts.sum())

    @property
    def mean_abs(self) -> float:
        """``Σ|g| / n`` (the Laplace scale MLE, SPEC §3.1); 0.0 for an empty histogram."""
        n = self.n
        return float(self.sum_abs.sum() / n) if n > 0 else 0.0

    @property
    def overflow_top(self) -> float:
        """Upper end of the uniform density used for the overflow bin: ``2·mean − HI`` where ``mean`` is the
        bin's mean magnitude (mean-preserving; at least ``HI·(1 + 2^-20)`` so the bin has a width)."""
        c = self.counts[HIST_K + 1]
        if c <= 0:
            return HIST_HI
        mean = self.sum_abs[HIST_K + 1] / c
        return float(max(2.0 * mean - HIST_HI, HIST_HI * (1.0 + 2.0**-20)))

    @property
    def max_abs_bound(self) -> float:
        """An upper bound on max|g|: for the highest non-empty bin ``[lo, hi)`` with ``c`` samples summing to
        ``S``, ``min(hi, S − (c−1)·lo)`` (every other sample in the bin is ≥ lo). For the overflow bin
        (``hi = ∞``) this is ``S − (c−1)·HI``. The zero bin gives ``HIST_LO``; 0.0 for an empty histogram."""
        nz = np.flatnonzero(self.counts > 0)
        if nz.size == 0:
            return 0.0
        j = int(nz[-1])
        if j == 0:
            return HIST_LO
        edges = hist_edges()
        lo = float(edges[j - 1]) if j <= HIST_K else HIST_HI
        hi = float(edges[j]) if j <= HIST_K else math.inf
        c, s = float(self.counts[j]), float(self.sum_abs[j])
        bound = s - (c - 1.0) * lo
        # rounding in S may push the bound a hair below the true max: never report less than lo
        return float(max(min(hi, bound * (1.0 + 1e-12)), lo))

    def __repr__(self) -> str:
        nz = int((self.counts > 0).sum())
        return (
            f"LogHistogram(n={self.n:.0f}, mean_abs={self.mean_abs:.4g}, nonempty_bins={nz}, "
            f"zero_bin={self.counts[0]:.0f}, overflow={self.counts[HIST_K + 1]:.0f})"
        )


def _top(h: LogHistogram) -> tuple[int, float] | None:
    """(highest bin holding a non-zero magnitude, an upper bound on max|g|); ``None`` when every sample is 0.

    A regular top bin bounds max|g| within a quarter octave (:attr:`LogHistogram.max_abs_bound`); the overflow
    bin by ``S − (c − 1)·HI``; the zero bin by its Σ|g| (every magnitude in it is >= 0)."""
    nz = np.flatnonzero(h.counts[1:] > 0)
    if nz.size:
        return int(nz[-1]) + 1, h.max_abs_bound
    if h.sum_abs[0] > 0:
        return 0, float(h.sum_abs[0])
    return None


def hist_in_range(h: LogHistogram) -> bool:
    """Whether the bins represent ``h``'s samples: max|g| in [``HIST_FIT_LO``, ``HIST_HI``) (nothing overflowed,
    24 octaves of log bins below the largest magnitude), or every sample is zero."""
    top = _top(h)
    return top is None or _FIT_FIRST <= top[0] <= HIST_K


def hist_shift(h: LogHistogram, shift: int = 0) -> int:
    """The octave shift to bin samples like ``h``'s with, ``h`` having been binned as |g|·2^-``shift``.

    * ``shift`` itself while max|g|·2^-shift lies in [2^-12, 2^12) (or every sample is zero): a small drift
      never changes the binning;
    * else 0 when the absolute max|g| lies in [2^-12, 2^12) (today's binning);
    * else the exponent of max|g| (it then bins into [1, 2)), or, when only an upper bound is known (the samples
      overflowed or fell in the zero bin), that bound's exponent − 12: the bound lands in [2^12, 2^13), and max|g|
      (at least the bound / count) within the range for up to 2^28 samples.
    """
    s = int(shift)
    top = _top(h)
    if top is None:
        return s
    j, bound = top
    if _KEEP[0] <= j <= _KEEP[1]:
        return s
    e = s + math.frexp(bound)[1] - 1  # floor(log2 max|g|) in absolute units (an upper bound when loose)
    if 1 <= j <= HIST_K:
        return 0 if -_KEEP_OCTAVES <= e < _KEEP_OCTAVES else e
    return e - _LOOSE_TOP
