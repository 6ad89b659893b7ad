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
            raise ValueError(f"LaplaceTail `scale` must be finite and > 0, got {self.scale!r} (an all-zero "
                             "gradient has no tail to design for: the codec handles it as zero in -> zero out)")
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

    # -- private closed forms --------------------------------------------------------------------------
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
            raise ValueError(f"PowerLawTail `gamma` must be finite and > 1 (a normalisable tail; the "
                             f"designs further need gamma > 3), got {self.gamma!r}")
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
        body = 2.0 * c * ((m - a) ** 3 / 3.0 + m**3 / (g - 3.0) - 2.0 * a * m * m / (g - 2.0)
                          + a * a * m / (g - 1.0))
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

    # -- private closed forms --------------------------------------------------------------------------
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
            tail = c * m ** (k + 1) * r ** (k + 1.0 - g) / (g - k - 1.0) if g > k + 1 else np.full(xa.shape, np.inf)
            xb = np.minimum(xa, m)
            body = c * (m ** (k + 1) - xb ** (k + 1)) / (k + 1.0) + at_m
            out.append(np.where(xa >= m, tail, body))
        return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EmpiricalTail:
    """Piecewise-constant density built from a :class:`LogHistogram` of |g| (SPEC §3.4).

    Each non-empty bin ``[lo, hi)`` carries its probability ``c_i/n`` uniformly (density of |g|:
    ``c_i/(n·(hi − lo))``), split evenly between the two signs. Our choices for the two open bins:

    * zero bin (|g| < 2^-40): uniform on ``[0, HIST_LO)``;
    * overflow bin (|g| >= 2^16): uniform on ``[HI, 2·mean − HI]`` with ``mean`` the bin's mean magnitude
      (mean-preserving; :attr:`LogHistogram.overflow_top`).

    The density ignores the within-bin means (``sum_abs``) of the ordinary bins; the bins are narrow
    (ratio 2^{1/4}), so the moments differ from the sample moments by well under 1%.
    """

    hist: LogHistogram
    lo: FloatArray = field(init=False, repr=False)
    hi: FloatArray = field(init=False, repr=False)
    mass: FloatArray = field(init=False, repr=False)
    dens: FloatArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        h = self.hist
        if not isinstance(h, LogHistogram):
            raise TypeError(f"EmpiricalTail needs a LogHistogram, got {type(h).__name__}")
        n = h.n
        if not n > 0:
            raise ValueError("EmpiricalTail `hist` is empty (n = 0): no distribution to design for")
        if h.counts[0] >= n:
            raise ValueError(f"EmpiricalTail `hist` has all {n:.0f} samples in the zero bin (|g| < 2^-40): an "
                             "all-zero gradient is handled by the codec as zero in -> zero out")
        e = hist_edges()
        lo_all = np.concatenate([[0.0], e[:-1], [HIST_HI]])
        hi_all = np.concatenate([[HIST_LO], e[1:], [h.overflow_top]])
        assert lo_all.size == HIST_K + 2
        keep = h.counts > 0
        lo, hi = lo_all[keep], hi_all[keep]
        mass = h.counts[keep] / n
        dens = mass / (hi - lo)
        for name, arr in (("lo", lo), ("hi", hi), ("mass", mass), ("dens", dens)):
            arr = np.ascontiguousarray(arr, dtype=np.float64)
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        # cumulative tables (segments are sorted and disjoint; gaps between them carry no mass)
        object.__setattr__(self, "_cum_mass", np.concatenate([[0.0], np.cumsum(mass)]))
        q = (dens / 2.0) ** (1.0 / 3.0)  # p^{1/3} on each segment (two-sided density is dens/2)
        object.__setattr__(self, "_q", q)
        object.__setattr__(self, "_cum_q", np.concatenate([[0.0], np.cumsum(q * (hi - lo))]))
        suf = []
        for k in (0, 1, 2):
            seg = dens / 2.0 * (hi ** (k + 1) - lo ** (k + 1)) / (k + 1.0)
            suf.append(np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]]))
        object.__setattr__(self, "_suf", suf)

    @classmethod
    def from_samples(cls, x: ArrayLike) -> EmpiricalTail:
        """``EmpiricalTail(LogHistogram.from_samples(x))``."""
        return cls(LogHistogram.from_samples(x))

    @property
    def n(self) -> float:
        return self.hist.n

    @property
    def max_abs(self) -> float:
        """Upper end of the support of the model density."""
        return float(self.hi[-1])

    def __repr__(self) -> str:
        return (f"EmpiricalTail(n={self.n:.0f}, mean_abs={self.hist.mean_abs:.4g}, "
                f"support=[0, {self.max_abs:.4g}], segments={self.lo.size})")

    def _seg(self, a: FloatArray) -> FloatArray:
        """Index of the first segment whose upper end is > a (== nseg beyond the support)."""
        return np.searchsorted(self.hi, a, side="right")

    def pdf(self, x: ArrayLike) -> FloatArray | float:
        """``dens_i/2`` when ``|x|`` lies in non-empty bin ``i``, else 0."""
        a = np.abs(_f64(x))
        j = self._seg(a)
        jc = np.minimum(j, self.lo.size - 1)
        inside = (j < self.lo.size) & (a >= self.lo[jc])
        return _out(np.where(inside, self.dens[jc] / 2.0, 0.0), x)

    def mass_within(self, a: ArrayLike) -> FloatArray | float:
        """``P(|g| <= a)`` — piecewise linear in ``a``."""
        aa = _nonneg(a, "a")
        j = self._seg(aa)
        jc = np.minimum(j, self.lo.size - 1)
        part = self.mass[jc] * np.clip((aa - self.lo[jc]) / (self.hi[jc] - self.lo[jc]), 0.0, 1.0)
        return _out(np.where(j < self.lo.size, self._cum_mass[jc] + part, 1.0), a)

    def truncation_error(self, alpha: ArrayLike) -> FloatArray | float:
        """``B(α) = Σ_i dens_i·[(hi_i − α)_+³ − (lo_i − α)_+³]/3`` (exact for the piecewise density)."""
        al = _nonneg(alpha, "alpha")
        x = al[..., None]
        v = self.dens * (np.maximum(self.hi - x, 0.0) ** 3 - np.maximum(self.lo - x, 0.0) ** 3) / 3.0
        return _out(v.sum(axis=-1), alpha)

    def sample(self, n: int, rng: np.random.Generator) -> FloatArray:
        """``n`` signed samples from the piecewise-constant model density."""
        n = _check_n(n)
        j = np.searchsorted(self._cum_mass[1:], rng.random(n) * self._cum_mass[-1], side="right")
        j = np.minimum(j, self.lo.size - 1)
        mag = self.lo[j] + rng.random(n) * (self.hi[j] - self.lo[j])
        return np.where(rng.random(n) < 0.5, -mag, mag)

    # -- private -----------------------------------------------------------------------------------------
    def _excess1(self, alpha: ArrayLike) -> FloatArray:
        x = _f64(alpha)[..., None]
        v = self.dens * (np.maximum(self.hi - x, 0.0) ** 2 - np.maximum(self.lo - x, 0.0) ** 2) / 2.0
        return v.sum(axis=-1)

    def _cbrt_cumulative(self, x: ArrayLike) -> FloatArray:
        """``Q(x) = ∫_0^x p^{1/3}`` (one side; piecewise linear)."""
        xa = _f64(x)
        j = self._seg(xa)
        jc = np.minimum(j, self.lo.size - 1)
        part = self._q[jc] * np.clip(xa - self.lo[jc], 0.0, self.hi[jc] - self.lo[jc])
        return np.where(j < self.lo.size, self._cum_q[jc] + part, self._cum_q[-1])

    def _cbrt_cumulative_inverse(self, y: ArrayLike) -> FloatArray:
        """Smallest ``x`` with ``Q(x) = y`` for ``0 <= y <= Q(∞)`` (exact: Q is linear within a bin)."""
        ya = _f64(y)
        j = np.searchsorted(self._cum_q[1:], ya, side="left")
        j = np.minimum(j, self.lo.size - 1)
        return self.lo[j] + np.clip((ya - self._cum_q[j]) / self._q[j], 0.0, self.hi[j] - self.lo[j])

    def _cbrt_integral(self, alpha: ArrayLike) -> FloatArray:
        return 2.0 * self._cbrt_cumulative(alpha)

    def _upper_moments(self, x: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        xa = _f64(x)
        nseg = self.lo.size
        j = self._seg(xa)
        jc = np.minimum(j, nseg - 1)
        start = np.maximum(self.lo[jc], xa)
        out = []
        for k in (0, 1, 2):
            part = self.dens[jc] / 2.0 * (self.hi[jc] ** (k + 1) - start ** (k + 1)) / (k + 1.0)
            rest = self._suf[k][np.minimum(j + 1, nseg)]
            out.append(np.where(j < nseg, part + rest, 0.0))
        return out[0], out[1], out[2]


Tail = Union[LaplaceTail, PowerLawTail, EmpiricalTail]
