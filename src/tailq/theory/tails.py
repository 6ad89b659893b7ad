"""Gradient tail models: Laplace (SPEC §3.1), flat-body power law (SPEC §3.2), empirical histogram (§3.4).

Every model is a symmetric density ``p`` of one gradient coordinate ``g``. Public methods (vectorised):

* ``pdf(x)`` — the two-sided density ``p(x)``.
* ``mass_within(a)`` — ``P(|g| <= a)``.
* ``truncation_error(alpha)`` — ``B(α) = E[(|g| − α)² · 1{|g| > α}]`` (SPEC §2), the per-coordinate
  truncation error (both signs counted).
* ``sample(n, rng)`` — ``n`` signed samples.

Private helpers used by :mod:`tailq.theory.design` (all for ``x, α >= 0``):

* ``_upper_moments(x)`` — ``U_k(x) = ∫_x^∞ t^k p(t) dt`` for ``k = 0, 1, 2`` (one side of the density).
* ``_excess1(α)`` — ``E[(|g| − α)·1{|g| > α}] = −B'(α)/2``.
* ``_cbrt_integral(α)`` — ``∫_{−α}^{α} p^{1/3}`` (the TNQ design integral, SPEC §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .histogram import HIST_HI, HIST_K, HIST_LO, LogHistogram, hist_edges

__all__ = ["LaplaceTail", "PowerLawTail", "EmpiricalTail", "Tail"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]


def _f64(x: ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def _nonneg(x: ArrayLike, name: str) -> FloatArray:
    arr = _f64(x)
    ok = float(arr) >= 0.0 if arr.ndim == 0 else bool((arr >= 0.0).all())  # NaN fails too
    if not ok:
        raise ValueError(f"`{name}` must be >= 0 (a threshold on |g|), got {arr}")
    return arr


def _out(v: FloatArray, like: ArrayLike) -> FloatArray | float:
    return float(v) if np.ndim(like) == 0 else v


def _check_n(n: int) -> int:
    n = int(n)
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    return n


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaplaceTail:
    """Laplace model ``p(g) = exp(−|g|/γ) / (2γ)`` with ``γ = scale`` (SPEC §3.1).

    Closed forms: ``P(|g| <= a) = 1 − e^{−a/γ}``; ``B(α) = 2γ²·e^{−α/γ}``;
    ``∫_{−α}^{α} p^{1/3} = 6γ·(2γ)^{−1/3}·(1 − e^{−α/(3γ)})``.
    """

    scale: float

    def __post_init__(self) -> None:
        s = float(self.scale)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(
                f"LaplaceTail `scale` must be finite and > 0, got {self.scale!r} (an all-zero "
                "gradient has no tail to design for: the codec handles it as zero in -> zero out)"
            )
        object.__setattr__(self, "scale", s)

    def pdf(self, x: ArrayLike) -> FloatArray | float:
        """``p(x) = exp(−|x|/γ) / (2γ)``."""
        g = self.scale
        return _out(np.exp(-np.abs(_f64(x)) / g) / (2.0 * g), x)

    def mass_within(self, a: ArrayLike) -> FloatArray | float:
        """``P(|g| <= a) = 1 − exp(−a/γ)``."""
        return _out(-np.expm1(-_nonneg(a, "a") / self.scale), a)

    def truncation_error(self, alpha: ArrayLike) -> FloatArray | float:
        """``B(α) = 2∫_α^∞ (x−α)² e^{−x/γ}/(2γ) dx = 2γ²·e^{−α/γ}``."""
        return _out(2.0 * self.scale**2 * np.exp(-_nonneg(alpha, "alpha") / self.scale), alpha)

    def sample(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``n`` i.i.d. Laplace(0, γ) samples."""
        return rng.laplace(0.0, self.scale, size=_check_n(n))

    # -- private closed forms ----------------------------------------------------------------------
    def _excess1(self, alpha: ArrayLike) -> FloatArray:
        return self.scale * np.exp(-_f64(alpha) / self.scale)

    def _cbrt_integral(self, alpha: ArrayLike) -> FloatArray:
        g = self.scale
        return 6.0 * g * (2.0 * g) ** (-1.0 / 3.0) * -np.expm1(-_f64(alpha) / (3.0 * g))

    def _upper_moments(self, x: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        g = self.scale
        xa = _f64(x)
        e = 0.5 * np.exp(-xa / g)
        return e, e * (xa + g), e * (xa * xa + 2.0 * g * xa + 2.0 * g * g)


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawTail:
    """Flat body + Pareto tail (SPEC §3.2, body shape is our choice):
    ``p(g) = C`` for ``|g| <= m``, ``C·(|g|/m)^{−γ}`` beyond, ``C = (γ − 1)/(2γm)``.

    Closed forms (``r = α/m``): ``P(|g| > a) = r^{1−γ}/γ`` for ``a >= m``;
    ``B(α) = 2m²/(γ(γ−2)(γ−3))·r^{3−γ}`` for ``α >= m`` and
    ``B(α) = 2C[(m−α)³/3 + m³/(γ−3) − 2αm²/(γ−2) + α²m/(γ−1)]`` for ``α < m`` (``B = ∞`` if ``γ <= 3``).
    """

    m: float
    gamma: float

    def __post_init__(self) -> None:
        m, g = float(self.m), float(self.gamma)
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"PowerLawTail `m` must be finite and > 0 (the body half-width), got {self.m!r}")
        if not (math.isfinite(g) and g > 1):
            raise ValueError(
                f"PowerLawTail `gamma` must be finite and > 1 (a normalisable tail; the "
                f"designs further need gamma > 3), got {self.gamma!r}"
            )
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "gamma", g)

    @property
    def c(self) -> float:
        """The body density ``C = (γ − 1)/(2γm)``."""
        return (self.gamma - 1.0) / (2.0 * self.gamma * self.m)

    def pdf(self, x: ArrayLike) -> FloatArray | float:
        """``C`` on ``|x| <= m``, ``C·(|x|/m)^{−γ}`` beyond."""
        r = np.abs(_f64(x)) / self.m
        return _out(self.c * np.where(r <= 1.0, 1.0, np.maximum(r, 1.0) ** -self.gamma), x)

    def mass_within(self, a: ArrayLike) -> FloatArray | float:
        """``P(|g| <= a)``: ``(γ−1)a/(γm)`` in the body, ``1 − (a/m)^{1−γ}/γ`` beyond."""
        g = self.gamma
        r = _nonneg(a, "a") / self.m
        body = (g - 1.0) / g * np.minimum(r, 1.0)
        tail = 1.0 - np.maximum(r, 1.0) ** (1.0 - g) / g
        return _out(np.where(r <= 1.0, body, tail), a)

    def truncation_error(self, alpha: ArrayLike) -> FloatArray | float:
        """``B(α)`` (see the class docstring; SPEC §3.2 for ``α >= m``). ``inf`` when ``γ <= 3``."""
        al = _nonneg(alpha, "alpha")
        if self.gamma <= 3.0:
            return _out(np.full(al.shape, np.inf), alpha)
        m, g, c = self.m, self.gamma, self.c
        r = al / m
        tail = 2.0 * m * m / (g * (g - 2.0) * (g - 3.0)) * np.maximum(r, 1.0) ** (3.0 - g)
        a = np.minimum(al, m)
        body = (
            2.0
            * c
            * ((m - a) ** 3 / 3.0 + m**3 / (g - 3.0) - 2.0 * a * m * m / (g - 2.0) + a * a * m / (g - 1.0))
        )
        return _out(np.where(r >= 1.0, tail, body), alpha)

    def sample(self, n: int, rng: np.random.Generator) -> FloatArray:
        """Inverse-CDF samples: ``|g| ~ U(0, m)`` w.p. ``(γ−1)/γ``, else ``m·U^{−1/(γ−1)}``; random sign."""
        n = _check_n(n)
        m, g = self.m, self.gamma
        in_body = rng.random(n) < (g - 1.0) / g
        u = rng.random(n)
        mag = np.where(in_body, m * u, m * (1.0 - u) ** (-1.0 / (g - 1.0)))
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        return sign * mag

    # -- private closed forms ----------------------------------------------------------------------
    def _h(self, x: ArrayLike) -> FloatArray:
        """Companding function of SPEC §3.2 (x >= 0): ``x/m`` on the body,
        ``1 + 3/(γ−3)·(1 − (x/m)^{(3−γ)/3})`` beyond (γ ≠ 3)."""
        g = self.gamma
        r = _f64(x) / self.m
        return np.where(r <= 1.0, r, 1.0 + 3.0 / (g - 3.0) * (1.0 - np.maximum(r, 1.0) ** ((3.0 - g) / 3.0)))

    def _h_inv(self, u: ArrayLike) -> FloatArray:
        """Inverse of :meth:`_h` for ``u >= 0``: ``m·u`` for ``u <= 1``,
        ``m·(1 − (γ−3)(u−1)/3)^{3/(3−γ)}`` beyond."""
        g = self.gamma
        ua = _f64(u)
        base = np.maximum(1.0 - (g - 3.0) * (np.maximum(ua, 1.0) - 1.0) / 3.0, 0.0)
        with np.errstate(divide="ignore"):
            tail = self.m * base ** (3.0 / (3.0 - g))
        return np.where(ua <= 1.0, self.m * ua, tail)

    def _excess1(self, alpha: ArrayLike) -> FloatArray:
        m, g, c = self.m, self.gamma, self.c
        al = _f64(alpha)
        r = al / m
        tail = m / (g * (g - 2.0)) * np.maximum(r, 1.0) ** (2.0 - g)
        a = np.minimum(al, m)
        body = 2.0 * c * ((m - a) ** 2 / 2.0 + m * m / (g - 2.0) - a * m / (g - 1.0))
        return np.where(r >= 1.0, tail, body)

    def _cbrt_integral(self, alpha: ArrayLike) -> FloatArray:
        # ∫_{−α}^{α} p^{1/3} = 2·C^{1/3}·m·h(α)   (SPEC §3.2 companding function)
        return 2.0 * self.c ** (1.0 / 3.0) * self.m * self._h(alpha)

    def _upper_moments(self, x: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        m, g, c = self.m, self.gamma, self.c
        xa = _f64(x)
        r = np.maximum(xa / m, 1.0)
        out = []
        for k in (0, 1, 2):
            at_m = c * m ** (k + 1) / (g - k - 1.0) if g > k + 1 else np.inf
            tail = (
                c * m ** (k + 1) * r ** (k + 1.0 - g) / (g - k - 1.0)
                if g > k + 1
                else np.full(xa.shape, np.inf)
            )
            xb = np.minimum(xa, m)
            body = c * (m ** (k + 1) - xb ** (k + 1)) / (k + 1.0) + at_m
            out.append(np.where(xa >= m, tail, body))
        return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------------------
def _lin_poly(u: FloatArray, v: FloatArray, t1: FloatArray, t2: FloatArray, n: int) -> FloatArray:
    """``∫_{t1}^{t2} t^n (u + v t) dt``."""
    return u * (t2 ** (n + 1) - t1 ** (n + 1)) / (n + 1.0) + v * (t2 ** (n + 2) - t1 ** (n + 2)) / (n + 2.0)


def _phi43(f1: FloatArray, f0: FloatArray) -> FloatArray:
    """``(f1^{4/3} − f0^{4/3}) / (f1 − f0)`` without cancellation (``→ (4/3)f^{1/3}`` as ``f1 → f0``):
    with ``a = f1^{1/3}``, ``b = f0^{1/3}``: ``(a³ + a²b + ab² + b³)/(a² + ab + b²)``."""
    a, b = np.cbrt(f1), np.cbrt(f0)
    return (a**3 + a * a * b + a * b * b + b**3) / (a * a + a * b + b * b)


_DENSITIES = ("linear", "uniform")
_K_MAX = 1.0 - 2.0**-20  # keeps the linear density > 0 inside every bin


@dataclass(frozen=True, eq=False)
class EmpiricalTail:
    """Piecewise density built from a :class:`LogHistogram` of |g| (SPEC §3.4), symmetric in sign.

    Each non-empty bin ``[lo, hi)`` (width ``w``) carries its probability ``P_i = c_i/n``. Within the bin the
    density of |g| is

    * ``density="linear"`` (default, our choice): linear, ``f(x) = (P_i/w)·(1 + k_i·2(x − mid)/w)`` with
      ``k_i = clip(6(μ_i − mid)/w, ±(1 − 2^-20))`` so that the bin mean equals the recorded mean
      ``μ_i = sum_abs_i/c_i`` (exact whenever the mean lies in ``[lo + w/3, hi − w/3]``). With 4 bins per
      octave a bin at ``|g| ≈ 8γ`` of a Laplace tail spans ``1.5γ`` and its true density falls by ``e^{1.5}``
      across it; a uniform bin then inflates ``B(α)`` by 20–30% there, the mean-matched linear one by
      a few percent.
    * ``density="uniform"``: uniform, ``f = P_i/w`` (the piecewise-constant model; ``k_i = 0``).

    Our choices for the two open bins: the zero bin (|g| < 2^-40) lives on ``[0, HIST_LO)``; the overflow bin
    (|g| >= 2^16) is uniform on ``[HI, 2·mean − HI]`` (mean-preserving, :attr:`LogHistogram.overflow_top`).
    All integrals the designs need (``B``, ``P``, ``∫p^{1/3}``, partial moments) are exact for this density.
    """

    hist: LogHistogram
    density: str = "linear"
    lo: FloatArray = field(init=False, repr=False)
    hi: FloatArray = field(init=False, repr=False)
    mass: FloatArray = field(init=False, repr=False)
    f_lo: FloatArray = field(init=False, repr=False)
    slope: FloatArray = field(init=False, repr=False)
    _k: FloatArray = field(init=False, repr=False)
    _cum_mass: FloatArray = field(init=False, repr=False)
    _cum_q: FloatArray = field(init=False, repr=False)
    _suf: list[FloatArray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        h = self.hist
        if not isinstance(h, LogHistogram):
            raise TypeError(f"EmpiricalTail needs a LogHistogram, got {type(h).__name__}")
        if self.density not in _DENSITIES:
            raise ValueError(f"EmpiricalTail `density` must be one of {_DENSITIES}, got {self.density!r}")
        n = h.n
        if not n > 0:
            raise ValueError("EmpiricalTail `hist` is empty (n = 0): no distribution to design for")
        if h.counts[0] >= n:
            raise ValueError(
                f"EmpiricalTail `hist` has all {n:.0f} samples in the zero bin (|g| < 2^-40): an "
                "all-zero gradient is handled by the codec as zero in -> zero out"
            )
        e = hist_edges()
        lo_all = np.concatenate([[0.0], e[:-1], [HIST_HI]])
        hi_all = np.concatenate([[HIST_LO], e[1:], [h.overflow_top]])
        assert lo_all.size == HIST_K + 2
        keep = h.counts > 0
        lo, hi = lo_all[keep], hi_all[keep]
        w = hi - lo
        mass = h.counts[keep] / n
        if self.density == "linear":
            mu = h.sum_abs[keep] / h.counts[keep]
            k = np.clip(6.0 * (mu - 0.5 * (lo + hi)) / w, -_K_MAX, _K_MAX)
        else:
            k = np.zeros_like(mass)
        f_lo = mass / w * (1.0 - k)  # density of |g| at the lower edge
        slope = 2.0 * k * mass / (w * w)
        for name, arr in (("lo", lo), ("hi", hi), ("mass", mass), ("f_lo", f_lo), ("slope", slope)):
            arr = np.ascontiguousarray(arr, dtype=np.float64)
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "_k", k)
        # cumulative tables (segments are sorted and disjoint; gaps between them carry no mass)
        object.__setattr__(self, "_cum_mass", np.concatenate([[0.0], np.cumsum(mass)]))
        qseg = self._cbrt_partial(np.arange(lo.size), hi)
        object.__setattr__(self, "_cum_q", np.concatenate([[0.0], np.cumsum(qseg)]))
        suf = []
        for n_ in (0, 1, 2):
            seg = self._raw_partial(np.arange(lo.size), lo, n_)
            suf.append(np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]]))
        object.__setattr__(self, "_suf", suf)

    @classmethod
    def from_samples(cls, x: ArrayLike, density: str = "linear") -> EmpiricalTail:
        """``EmpiricalTail(LogHistogram.from_samples(x), density)``."""
        return cls(LogHistogram.from_samples(x), density)

    @property
    def n(self) -> float:
        return self.hist.n

    @property
    def max_abs(self) -> float:
        """Upper end of the support of the model density."""
        return float(self.hi[-1])

    def __repr__(self) -> str:
        return (
            f"EmpiricalTail(n={self.n:.0f}, mean_abs={self.hist.mean_abs:.4g}, "
            f"support=[0, {self.max_abs:.4g}], segments={self.lo.size}, density={self.density!r})"
        )

    # -- segment helpers (j: segment index array, broadcast with the x arguments) ------------------
    def _seg(self, a: FloatArray) -> IntArray:
        """Index of the first segment whose upper end is > a (== nseg beyond the support)."""
        return np.searchsorted(self.hi, a, side="right")

    def _f(self, j: IntArray, x: FloatArray) -> FloatArray:
        """Density of |g| on segment j, linearly extended, at x."""
        return self.f_lo[j] + self.slope[j] * (x - self.lo[j])

    def _shifted_partial(
        self, j: IntArray, x1: FloatArray, x2: FloatArray, r: FloatArray, n: int
    ) -> FloatArray:
        """``∫_{x1}^{x2} (x − r)^n f_j(x) dx`` (one side, density of |g|)."""
        return _lin_poly(self._f(j, r), self.slope[j], x1 - r, x2 - r, n)

    def _raw_partial(self, j: IntArray, x1: FloatArray, n: int) -> FloatArray:
        """``∫_{x1}^{hi_j} x^n p(x) dx`` with ``p = f/2`` (two-sided density), shifted at ``lo_j``."""
        lo = self.lo[j]
        t1, t2 = x1 - lo, self.hi[j] - lo
        u, v = self.f_lo[j], self.slope[j]
        # x^n = Σ binom(n, i) lo^{n−i} t^i
        tot = _lin_poly(u, v, t1, t2, 0) * lo**n
        if n >= 1:
            tot = tot + n * lo ** (n - 1) * _lin_poly(u, v, t1, t2, 1)
        if n >= 2:
            tot = tot + _lin_poly(u, v, t1, t2, 2)
        return 0.5 * tot

    def _cbrt_partial(self, j: IntArray, x: FloatArray) -> FloatArray:
        """``∫_{lo_j}^{x} p^{1/3}`` with ``p = f/2`` linear: ``2^{−1/3}·(3/4)·(x − lo)·φ(f(x), f(lo))``."""
        f1 = np.maximum(self._f(j, x), 0.0)
        return 2.0 ** (-1.0 / 3.0) * 0.75 * (x - self.lo[j]) * _phi43(f1, self.f_lo[j])

    # -- public ------------------------------------------------------------------------------------
    def pdf(self, x: ArrayLike) -> FloatArray | float:
        """``f_i(|x|)/2`` when ``|x|`` lies in non-empty bin ``i``, else 0."""
        a = np.abs(_f64(x))
        j = self._seg(a)
        jc = np.minimum(j, self.lo.size - 1)
        inside = (j < self.lo.size) & (a >= self.lo[jc])
        return _out(np.where(inside, self._f(jc, a) / 2.0, 0.0), x)

    def mass_within(self, a: ArrayLike) -> FloatArray | float:
        """``P(|g| <= a)`` (piecewise quadratic in ``a``)."""
        aa = _nonneg(a, "a")
        j = self._seg(aa)
        jc = np.minimum(j, self.lo.size - 1)
        lo = self.lo[jc]
        x = np.clip(aa, lo, self.hi[jc])
        part = _lin_poly(self.f_lo[jc], self.slope[jc], np.zeros_like(x), x - lo, 0)
        return _out(np.where(j < self.lo.size, self._cum_mass[jc] + part, 1.0), a)

    def truncation_error(self, alpha: ArrayLike) -> FloatArray | float:
        """``B(α) = Σ_i ∫_{max(lo_i, α)}^{hi_i} (x − α)² f_i(x) dx`` (exact for the model density)."""
        al = _nonneg(alpha, "alpha")
        return _out(self._tail_poly(al, 2), alpha)

    def _tail_poly(self, al: FloatArray, n: int) -> FloatArray:
        x = al[..., None]
        j = np.arange(self.lo.size)
        x1 = np.maximum(self.lo, x)
        x2 = np.maximum(self.hi, x)
        return self._shifted_partial(j, x1, x2, x, n).sum(axis=-1)

    def sample(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``n`` signed samples from the model density (bin by probability, inverse CDF within the bin)."""
        n = _check_n(n)
        j = np.searchsorted(self._cum_mass[1:], rng.random(n) * self._cum_mass[-1], side="right")
        j = np.minimum(j, self.lo.size - 1)
        k = self._k[j]
        u = rng.random(n)
        # within-bin CDF in t = (x − lo)/w: (1 − k)t + k t² = u
        t = 2.0 * u / ((1.0 - k) + np.sqrt((1.0 - k) ** 2 + 4.0 * k * u))
        mag = self.lo[j] + np.clip(t, 0.0, 1.0) * (self.hi[j] - self.lo[j])
        return np.where(rng.random(n) < 0.5, -mag, mag)

    # -- private -----------------------------------------------------------------------------------
    def _excess1(self, alpha: ArrayLike) -> FloatArray:
        return self._tail_poly(_f64(alpha), 1)

    def _cbrt_cumulative(self, x: ArrayLike) -> FloatArray:
        """``Q(x) = ∫_0^x p^{1/3}`` (one side)."""
        xa = _f64(x)
        j = self._seg(xa)
        jc = np.minimum(j, self.lo.size - 1)
        part = self._cbrt_partial(jc, np.clip(xa, self.lo[jc], self.hi[jc]))
        return np.where(j < self.lo.size, self._cum_q[jc] + part, self._cum_q[-1])

    def _cbrt_cumulative_inverse(self, y: ArrayLike) -> FloatArray:
        """Smallest ``x`` with ``Q(x) = y`` for ``0 <= y <= Q(∞)``, in closed form within a bin:
        ``f(x)^{4/3} = f(lo)^{4/3} + (4/3)·2^{1/3}·S·y'`` (``S`` the slope, ``y'`` the part of ``y`` in the
        bin),
        i.e. ``x − lo = (f(lo)/S)·expm1((3/4)·log1p(z))`` with ``z = (4/3)2^{1/3}S y'/f(lo)^{4/3}``."""
        ya = _f64(y)
        j = np.searchsorted(self._cum_q[1:], ya, side="left")
        j = np.minimum(j, self.lo.size - 1)
        yp = np.maximum(ya - self._cum_q[j], 0.0)
        g0, sl = self.f_lo[j], self.slope[j]
        z = (4.0 / 3.0) * 2.0 ** (1.0 / 3.0) * sl * yp / g0 ** (4.0 / 3.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_lin = g0 / sl * np.expm1(0.75 * np.log1p(np.maximum(z, -1.0)))
        d_flat = yp / (g0 / 2.0) ** (1.0 / 3.0)
        d = np.where(np.abs(z) < 1e-8, d_flat * (1.0 - z / 8.0), d_lin)
        return self.lo[j] + np.clip(d, 0.0, self.hi[j] - self.lo[j])

    def _cbrt_integral(self, alpha: ArrayLike) -> FloatArray:
        return 2.0 * self._cbrt_cumulative(alpha)

    def _upper_moments(self, x: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        xa = _f64(x)
        nseg = self.lo.size
        j = self._seg(xa)
        jc = np.minimum(j, nseg - 1)
        start = np.maximum(self.lo[jc], xa)
        out = []
        for n_ in (0, 1, 2):
            part = self._raw_partial(jc, start, n_)
            rest = self._suf[n_][np.minimum(j + 1, nseg)]
            out.append(np.where(j < nseg, part + rest, 0.0))
        return out[0], out[1], out[2]


Tail = Union[LaplaceTail, PowerLawTail, EmpiricalTail]  # noqa: UP007 (runtime alias, py3.10)
