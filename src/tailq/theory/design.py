"""Truncated quantizer designs: TUQ, TNQ, TBQ for the Laplace, power-law and empirical tails (SPEC §2, §3).

A design is a truncation threshold ``α`` and ``s + 1 = 2^bits`` odd-symmetric levels on ``[−α, α]``. It is
chosen by minimising the design proxy of SPEC §2, ``V + B(α)``, where ``B`` is the truncation error and ``V``
the proxy of the stochastic-rounding variance:

* **TNQ** (optimal non-uniform density): ``V* = (∫_{−α}^{α} p^{1/3})³ / (4s²)``; levels from
  ``∫_{−α}^{l_k} λ* = k`` with ``λ* ∝ p^{1/3}``.
* **TUQ** (uniform levels on ``[−α, α]``): ``V = α²/s²`` (SPEC §3.2; ``Δ²/4`` with ``Δ = 2α/s``, the factor
  ``P(|g| <= α)`` of the density proxy is omitted, as in SPEC).
* **TBQ** (bi-scaled, SPEC §3.2): ``(Δ₁²/4)·P(|g| <= β) + (Δ₂²/4)·P(β < |g| <= α)``,
  ``Δ₁ = 2β/s₁``, ``Δ₂ = (α − β)/s₂``, ``s₁ + 2s₂ = s`` (``s`` is odd so ``s₁`` is odd).

``exact_mse(levels, tail)`` is the *true* expected squared error of truncation + unbiased stochastic rounding
to the levels: ``Σ_j ∫_{l_j}^{l_{j+1}} (l_{j+1} − x)(x − l_j) p(x) dx + B(α)`` (closed forms, no quadrature).
Real rounding averages about ``Δ²/6`` per interval, so ``exact_mse`` sits below ``predicted_mse``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special

from .tails import EmpiricalTail, LaplaceTail, PowerLawTail, Tail

__all__ = [
    "SCHEMES",
    "HeavyTailError",
    "Design",
    "design",
    "exact_mse",
    "etq_bound",
    "tnq_levels",
    "LAPLACE_C",
]

SCHEMES: tuple[str, ...] = ("tuq", "tnq", "tbq")
LAPLACE_C: float = 1.5 * math.sqrt(6.0)  # c = 3√6/2 ≈ 3.6742 (SPEC §3.1)

FloatArray = NDArray[np.float64]


class HeavyTailError(ValueError):
    """The power-law closed forms need ``γ > 3`` (finite variance); use the empirical design instead."""


@dataclass(frozen=True, eq=False)
class Design:
    """One truncated-quantizer design (SPEC §2, §3).

    ``levels``: float64, length ``s + 1``, strictly increasing, odd-symmetric, ``levels[0] = −alpha``,
    ``levels[-1] = alpha`` (read-only). ``predicted_mse``: the design proxy ``V + B(α)`` at the optimum (per
    coordinate). ``method``: ``"closed-form"`` or ``"numerical"``. ``beta, s1, s2``: the TBQ split (None
    otherwise). ``exact_mse``: the true expected MSE of truncation + stochastic rounding to ``levels``.
    """

    scheme: str
    tail: Any
    bits: int
    s: int
    alpha: float
    levels: FloatArray
    predicted_mse: float
    method: str
    notes: tuple[str, ...] = ()
    beta: float | None = None
    s1: int | None = None
    s2: int | None = None

    @cached_property
    def exact_mse(self) -> float:
        """``exact_mse(self.levels, self.tail)``."""
        return exact_mse(self.levels, self.tail)

    def __repr__(self) -> str:
        extra = f", beta={self.beta:.6g}, s1={self.s1}, s2={self.s2}" if self.scheme == "tbq" else ""
        return (
            f"Design(scheme={self.scheme!r}, bits={self.bits}, s={self.s}, alpha={self.alpha:.6g}"
            f"{extra}, predicted_mse={self.predicted_mse:.6g}, method={self.method!r}, tail={self.tail!r})"
        )


# ---------------------------------------------------------------------------------------------------------
# validation
def _check_scheme(scheme: Any) -> str:
    if not isinstance(scheme, str) or scheme.lower() not in SCHEMES:
        raise ValueError(f"`scheme` must be one of {SCHEMES}, got {scheme!r}")
    return scheme.lower()


def _check_bits(bits: Any) -> int:
    try:
        if isinstance(bits, bool):
            raise TypeError
        b = operator.index(bits)
    except TypeError:
        raise ValueError(f"`bits` must be an integer in 1..8, got {bits!r}") from None
    if not 1 <= b <= 8:
        raise ValueError(f"`bits` must be an integer in 1..8 (s = 2^bits - 1 intervals), got {b}")
    return b


def _check_tail(tail: Any) -> None:
    if not isinstance(tail, (LaplaceTail, PowerLawTail, EmpiricalTail)):
        raise TypeError(
            f"`tail` must be a LaplaceTail, PowerLawTail or EmpiricalTail, got {type(tail).__name__}"
        )
    if isinstance(tail, PowerLawTail) and tail.gamma <= 3.0:
        raise HeavyTailError(
            f"power-law tail with gamma={tail.gamma:.4g} <= 3 has infinite variance: the closed forms of "
            "SPEC §3.2 need gamma > 3; use the empirical design (EmpiricalTail of a LogHistogram) instead"
        )


def _from_positive(pos: ArrayLike) -> FloatArray:
    """Odd-symmetric level vector from its positive half (s odd: no level at 0)."""
    p = np.asarray(pos, dtype=np.float64)
    return np.concatenate([-p[::-1], p])


# ---------------------------------------------------------------------------------------------------------
# exact MSE
def _interval_moments(tail: Tail, a: FloatArray, b: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``M_k = ∫_a^b x^k p(x) dx`` (k = 0, 1, 2) for ``a <= b`` from the tail's upper moments ``U_k``:
    positive part ``U_k(a⁺) − U_k(b⁺)``; negative part by symmetry ``(−1)^k (U_k(−b⁻) − U_k(−a⁻))``."""
    ap, bp = np.maximum(a, 0.0), np.maximum(b, 0.0)
    an, bn = np.minimum(a, 0.0), np.minimum(b, 0.0)
    ua, ub = tail._upper_moments(ap), tail._upper_moments(bp)
    va, vb = tail._upper_moments(-bn), tail._upper_moments(-an)
    out = []
    for k in range(3):
        pos = ua[k] - ub[k]
        neg = va[k] - vb[k]
        out.append(pos + (neg if k % 2 == 0 else -neg))
    return out[0], out[1], out[2]


def exact_mse(levels: ArrayLike, tail: Tail) -> float:
    """True expected per-coordinate squared error of truncation at ``[l_0, l_s]`` followed by unbiased
    stochastic rounding to ``levels`` (SPEC §2, §3.4):
    ``Σ_j ∫_{l_j}^{l_{j+1}} (l_{j+1} − x)(x − l_j) p(x) dx + [B(l_s) + B(−l_0)]/2``
    (each half of ``B`` is one sign's truncation error; ``= B(α)`` for symmetric levels).

    Evaluated in closed form from the tail's partial moments (``−M₂ + (l+u)M₁ − l·u·M₀`` per interval).
    """
    lv = np.asarray(levels, dtype=np.float64).reshape(-1)
    if lv.size < 2 or not np.isfinite(lv).all():
        raise ValueError("`levels` must hold at least 2 finite values")
    if not (np.diff(lv) > 0).all():
        raise ValueError("`levels` must be strictly increasing")
    if not (lv[0] <= 0.0 <= lv[-1]):
        raise ValueError(f"`levels` must bracket 0 (l_0 <= 0 <= l_s), got [{lv[0]}, {lv[-1]}]")
    lo, hi = lv[:-1], lv[1:]
    m0, m1, m2 = _interval_moments(tail, lo, hi)
    var = np.maximum(-m2 + (lo + hi) * m1 - lo * hi * m0, 0.0)
    b = 0.5 * (float(tail.truncation_error(float(lv[-1]))) + float(tail.truncation_error(float(-lv[0]))))
    return float(var.sum() + b)


def etq_bound(design: Design, d: int, n_workers: int) -> float:
    """Extra error term of the convergence bound (SPEC §8): ``E_TQ = d · MSE* / N`` with ``MSE*`` the design's
    ``predicted_mse``. For Laplace TNQ this is [Y2]'s ``27 d γ² / (N (s + 3√6/2)²)``."""
    if int(d) < 1 or int(n_workers) < 1:
        raise ValueError(f"`d` and `n_workers` must be >= 1, got d={d}, n_workers={n_workers}")
    return float(d) * float(design.predicted_mse) / float(n_workers)


# ---------------------------------------------------------------------------------------------------------
# closed forms
def _laplace_tnq(t: LaplaceTail, s: int) -> tuple[FloatArray, float, tuple[str, ...]]:
    """SPEC §3.1: ``α* = 3γ ln(1 + s/c)``, ``l_k = sgn(2k−s)·3γ·ln((s+c)/(s+c−|2k−s|))``,
    ``MSE* = 27γ²/(s+c)²``, ``c = 3√6/2``."""
    g, c = t.scale, LAPLACE_C
    j = np.arange(1, s + 1, 2, dtype=np.float64)  # |2k − s| for the positive half
    pos = 3.0 * g * np.log((s + c) / (s + c - j))
    pos[-1] = 3.0 * g * math.log1p(s / c)
    return pos, 27.0 * g * g / (s + c) ** 2, ("closed form SPEC §3.1: alpha* = 3γ·ln(1 + s/c), c = 3√6/2",)


def _laplace_tuq(t: LaplaceTail, s: int) -> tuple[FloatArray, float, tuple[str, ...]]:
    """TUQ on Laplace: minimise ``α²/s² + 2γ²e^{−α/γ}``; stationarity ``(α/γ)e^{α/γ} = s²`` gives
    ``α* = γ·W(s²)`` (Lambert W) and ``MSE* = γ²·W(W + 2)/s²``."""
    g = t.scale
    w = float(special.lambertw(float(s) ** 2).real)
    alpha = g * w
    pos = alpha * np.arange(1, s + 1, 2, dtype=np.float64) / s
    pos[-1] = alpha
    return (
        pos,
        g * g * w * (w + 2.0) / s**2,
        ("closed form: alpha* = γ·W(s²) (Lambert W) minimises alpha²/s² + B(alpha)",),
    )


def _powerlaw_k(t: PowerLawTail) -> float:
    g = t.gamma
    return (g - 3.0) * math.sqrt(2.0 / (3.0 * (g - 1.0) * (g - 2.0)))


def _powerlaw_tnq(t: PowerLawTail, s: int) -> tuple[FloatArray, float, tuple[str, ...]]:
    """SPEC §3.2 TNQ: ``k = (γ−3)·√(2/(3(γ−1)(γ−2)))``; if ``3 + ks >= γ``:
    ``α* = m((3+ks)/γ)^{3/(γ−3)}``, ``MSE* = 2γ²m²/(3(γ−2)(γ−3)(3+ks)²)``, levels by companding
    ``l = h⁻¹((2k/s − 1)·h(α*))``. Otherwise the optimum lies in the flat body (``α* < m``): with ``r = α/m``
    stationarity is ``(3/s² − 1)r² + 2γr/(γ−1) − γ/(γ−2) = 0`` and the levels are uniform."""
    m, g = t.m, t.gamma
    k = _powerlaw_k(t)
    j = np.arange(1, s + 1, 2, dtype=np.float64) / s
    if 3.0 + k * s >= g:
        alpha = m * ((3.0 + k * s) / g) ** (3.0 / (g - 3.0))
        mse = 2.0 * g * g * m * m / (3.0 * (g - 2.0) * (g - 3.0) * (3.0 + k * s) ** 2)
        pos = t._h_inv(j * float(t._h(alpha)))
        pos[-1] = alpha
        return (
            pos,
            float(mse),
            ("closed form SPEC §3.2: alpha* = m((3 + k s)/γ)^(3/(γ−3)), levels by companding",),
        )
    a2, a1, gg = 3.0 / s**2 - 1.0, 2.0 * g / (g - 1.0), g / (g - 2.0)
    r = 2.0 * gg / (a1 + math.sqrt(a1 * a1 + 4.0 * a2 * gg))
    alpha = m * r
    mse = 2.0 * t.c * alpha**3 / s**2 + float(t.truncation_error(alpha))
    pos = alpha * j
    pos[-1] = alpha
    return (
        pos,
        mse,
        (
            f"3 + k·s = {3 + k * s:.4g} < γ = {g:.4g}: the reference spec's alpha* = m does not hold "
            "(docs/spec.md Appendix A); the optimum lies in the flat body (alpha* < m, root of a quadratic) and the "
            "levels are uniform",
        ),
    )


def _powerlaw_tuq(t: PowerLawTail, s: int) -> tuple[FloatArray, float, tuple[str, ...]]:
    """SPEC §3.2 TUQ: minimise ``α²/s² + B(α)``: ``α* = m(s²/(γ(γ−2)))^{1/(γ−1)}`` when that is ``>= m``;
    otherwise (``α* < m``) ``r = α/m`` solves ``r² − 2Ar + γ/(γ−2) = 0``, ``A = γ(1 + 1/s²)/(γ−1)``."""
    m, g = t.m, t.gamma
    ratio = s * s / (g * (g - 2.0))
    if ratio >= 1.0:
        alpha = m * ratio ** (1.0 / (g - 1.0))
        note = "closed form SPEC §3.2: alpha* = m(s²/(γ(γ−2)))^(1/(γ−1))"
    else:
        a = g * (1.0 + 1.0 / s**2) / (g - 1.0)
        gg = g / (g - 2.0)
        alpha = m * gg / (a + math.sqrt(a * a - gg))
        note = "s² < γ(γ−2): alpha* < m, root of the body quadratic of alpha²/s² + B(alpha)"
    pos = alpha * np.arange(1, s + 1, 2, dtype=np.float64) / s
    pos[-1] = alpha
    return pos, alpha**2 / s**2 + float(t.truncation_error(alpha)), (note,)


def _tnq_positive_levels(tail: Tail, s: int, alpha: float) -> FloatArray:
    """Positive half of the TNQ levels at a given ``α``: ``∫_{−α}^{l_k} λ* = k`` with ``λ* ∝ p^{1/3}``."""
    j = np.arange(1, s + 1, 2, dtype=np.float64) / s
    if isinstance(tail, LaplaceTail):
        g = tail.scale
        pos = -3.0 * g * np.log1p(j * np.expm1(-alpha / (3.0 * g)))  # Q(x) ∝ 1 − e^{−x/(3γ)}
    elif isinstance(tail, PowerLawTail):
        pos = tail._h_inv(j * float(tail._h(alpha)))
    else:
        pos = tail._cbrt_cumulative_inverse(j * float(tail._cbrt_cumulative(alpha)))
    pos = np.asarray(pos, dtype=np.float64)
    pos[-1] = alpha
    return pos


def tnq_levels(tail: Tail, bits: int, alpha: float) -> FloatArray:
    """TNQ levels for a *given* truncation threshold ``α`` (SPEC §2): the ``s + 1`` odd-symmetric levels with
    ``∫_{−α}^{l_k} λ* = k``, ``λ* = s·p^{1/3}/∫_{−α}^{α} p^{1/3}``.
    ``design("tnq", ...)`` uses this at ``α*``."""
    b = _check_bits(bits)
    _check_tail(tail)
    a = float(alpha)
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"`alpha` must be finite and > 0, got {alpha!r}")
    return _from_positive(_tnq_positive_levels(tail, 2**b - 1, a))


# ---------------------------------------------------------------------------------------------------------
# numerical designs (any tail)
def _upper_bracket(tail: Tail) -> float:
    if isinstance(tail, EmpiricalTail):
        return tail.max_abs
    if isinstance(tail, LaplaceTail):
        return 60.0 * tail.scale
    return tail.m * 1e12 ** (1.0 / (tail.gamma - 1.0)) * 10.0  # P(|g| > hi) < 1e-12


def _tuq_numeric(tail: Tail, s: int) -> float:
    """``argmin α²/s² + B(α)``: root of the (increasing) derivative ``2α/s² − 2E[(|g| − α)_+]``."""

    def dphi(a: float) -> float:
        return a / s**2 - float(tail._excess1(a))

    hi = _upper_bracket(tail)
    while dphi(hi) <= 0:
        hi *= 2.0
    return float(optimize.brentq(dphi, 0.0, hi, xtol=1e-15 * hi, rtol=4 * np.finfo(float).eps, maxiter=200))


def _tnq_objective(tail: Tail, s: int, alpha: ArrayLike) -> FloatArray:
    """SPEC §2: ``(∫_{−α}^{α} p^{1/3})³/(4s²) + B(α)``."""
    return tail._cbrt_integral(alpha) ** 3 / (4.0 * s * s) + tail.truncation_error(alpha)


def _grid_then_bounded(f: Any, grid: FloatArray) -> float:
    vals = f(grid)
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    if hi <= lo:
        return float(grid[i])
    res = optimize.minimize_scalar(
        lambda a: float(f(np.asarray(a))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-12 * hi, "maxiter": 500},
    )
    return float(res.x) if res.fun <= vals[i] else float(grid[i])


def _search_grid(tail: Tail, a_ref: float) -> FloatArray:
    if isinstance(tail, EmpiricalTail):
        top = tail.max_abs
        lo = max(float(tail.lo[tail.lo > 0].min()) if (tail.lo > 0).any() else tail.hi[0], top * 1e-14)
        g = np.geomspace(lo, top, 400)
        edges = np.concatenate([tail.lo, tail.hi])
        return np.unique(np.concatenate([g, edges[(edges >= lo) & (edges <= top)]]))
    return np.geomspace(a_ref / 50.0, a_ref * 50.0, 400)


def _tnq_numeric(tail: Tail, s: int, a_ref: float) -> float:
    return _grid_then_bounded(lambda a: _tnq_objective(tail, s, a), _search_grid(tail, a_ref))


def _tbq_objective(tail: Tail, s1: int, s2: int, alpha: Any, beta: Any) -> Any:
    """SPEC §3.2 TBQ: ``(β/s₁)²P(|g|<=β) + ((α−β)/(2s₂))²P(β<|g|<=α) + B(α)`` (``s₂ = 0``: ``α = β``)."""
    pb = tail.mass_within(beta)
    if s2 == 0:
        return (beta / s1) ** 2 * pb + tail.truncation_error(beta)
    pa = tail.mass_within(alpha)
    return (
        (beta / s1) ** 2 * pb + ((alpha - beta) / (2.0 * s2)) ** 2 * (pa - pb) + tail.truncation_error(alpha)
    )


def _tbq_numeric(tail: Tail, s: int, a_ref: float) -> tuple[float, float, int, int, float]:
    """Minimise the TBQ objective over odd ``s₁`` (``s₂ = (s − s₁)/2``) and ``0 < β <= α``: a vectorised grid
    over (s₁, α, β) picks the three best ``s₁``; each is refined by Nelder–Mead on ``(ln β, ln(α − β))``
    (bounded Brent for ``s₂ = 0``). Returns ``(alpha, beta, s1, s2, objective)``."""
    if isinstance(tail, EmpiricalTail):
        grid = np.geomspace(min(a_ref / 40.0, tail.max_abs / 2.0), tail.max_abs, 96)
    else:
        grid = np.geomspace(a_ref / 40.0, a_ref * 40.0, 96)
    p = np.asarray(tail.mass_within(grid), dtype=np.float64)
    b = np.asarray(tail.truncation_error(grid), dtype=np.float64)
    s1s = np.arange(1, s + 1, 2)
    s2s = (s - s1s) // 2
    # s2 = 0 (s1 = s): uniform grid with the P factor
    cand: list[tuple[float, int]] = []
    f0 = (grid / s) ** 2 * p + b
    cand.append((float(f0.min()), s))
    if s > 1:
        s1v = s1s[:-1].astype(np.float64)[:, None, None]
        s2v = s2s[:-1].astype(np.float64)[:, None, None]
        al, be = grid[None, :, None], grid[None, None, :]
        f = (
            (be / s1v) ** 2 * p[None, None, :]
            + ((al - be) / (2.0 * s2v)) ** 2 * (p[None, :, None] - p[None, None, :])
            + b[None, :, None]
        )
        f = np.where(be < al, f, np.inf)
        best = f.reshape(f.shape[0], -1).min(axis=1)
        for i in np.argsort(best)[:3]:
            cand.append((float(best[i]), int(s1s[i])))
    cand.sort()
    results = []
    for _, s1 in cand[:3]:
        s2 = (s - s1) // 2
        if s2 == 0:
            beta = _grid_then_bounded(lambda x: _tbq_objective(tail, s, 0, x, x), grid)
            results.append((float(_tbq_objective(tail, s, 0, beta, beta)), beta, beta, s1, 0))
            continue
        ff = (
            (grid[None, :] / s1) ** 2 * p[None, :]
            + ((grid[:, None] - grid[None, :]) / (2.0 * s2)) ** 2 * (p[:, None] - p[None, :])
            + b[:, None]
        )
        ff = np.where(grid[None, :] < grid[:, None], ff, np.inf)
        ia, ib = np.unravel_index(int(np.argmin(ff)), ff.shape)
        x0 = np.array([math.log(grid[ib]), math.log(grid[ia] - grid[ib])])
        fscale = float(ff[ia, ib])

        def obj(x: FloatArray, s1: int = s1, s2: int = s2) -> float:
            be_, d_ = math.exp(x[0]), math.exp(x[1])
            return float(_tbq_objective(tail, s1, s2, be_ + d_, be_))

        res = optimize.minimize(
            obj,
            x0,
            method="Nelder-Mead",
            options={
                "xatol": 1e-10,
                "fatol": 1e-14 * fscale,
                "maxiter": 4000,
                "initial_simplex": np.array([x0, x0 + [0.05, 0.0], x0 + [0.0, 0.05]]),
            },
        )
        x = res.x if res.fun <= fscale else x0
        beta, d = math.exp(x[0]), math.exp(x[1])
        results.append((obj(x), beta + d, beta, s1, s2))
    fbest, alpha, beta, s1, s2 = min(results)
    return alpha, beta, s1, s2, fbest


def _tbq_levels(alpha: float, beta: float, s1: int, s2: int) -> FloatArray:
    """Positive half of the bi-scaled grid: ``β(2i − s₁)/s₁`` (inner, odd numerators) then
    ``β + j(α − β)/s₂``, ``j = 1..s₂``."""
    inner = beta * np.arange(1, s1 + 1, 2, dtype=np.float64) / s1
    outer = beta + (alpha - beta) * np.arange(1, s2 + 1, dtype=np.float64) / max(s2, 1)
    pos = np.concatenate([inner, outer]) if s2 > 0 else inner
    pos[-1] = alpha
    return pos


# ---------------------------------------------------------------------------------------------------------
# refinement (exact rounding variance)
#
# F(levels) = Σ_j ∫_{l_j}^{l_{j+1}} (l_{j+1} − x)(x − l_j) p(x) dx, with the levels odd-symmetric and α fixed.
# Work on the positive half p_0 < … < p_{M−1} = α (the innermost interval is [−p_0, p_0]). With
# a_i = p_{i−1} (a_0 = −p_0) and c_i = p_{i+1}:
#   ∂F/∂p_i  ∝ g_i = ∫_{a_i}^{p_i} (x − a_i) p − ∫_{p_i}^{c_i} (c_i − x) p
#   ∂g_i/∂p_i = (c_i − a_i)·p(p_i)  (+ P(|x| <= p_0) for i = 0),   ∂g_i/∂p_{i+1} = −P(p_i < x < p_{i+1}).
# Each coordinate problem is convex (the SPEC §3.4 coordinate descent), but the Hessian is a weighted graph
# Laplacian, so plain sweeps need O(s²) passes; a Newton step on the tridiagonal system with a backtracking
# line search (falling back to one coordinate sweep when it cannot descend) converges in a few iterations.
def _half_variance(p: FloatArray, tail: Tail) -> float:
    lv = _from_positive(p)
    lo, hi = lv[:-1], lv[1:]
    m0, m1, m2 = _interval_moments(tail, lo, hi)
    return 0.5 * float((-m2 + (lo + hi) * m1 - lo * hi * m0).sum())


def _grad_hess(p: FloatArray, tail: Tail) -> tuple[FloatArray, FloatArray, FloatArray]:
    x, c = p[:-1], p[1:]
    a = np.concatenate([[-p[0]], p[:-2]])
    m0l, m1l, _ = _interval_moments(tail, a, x)
    m0r, m1r, _ = _interval_moments(tail, x, c)
    g = (m1l - a * m0l) - (c * m0r - m1r)
    diag = (c - a) * np.asarray(tail.pdf(x), dtype=np.float64)
    diag[0] += m0l[0]
    return g, diag, -m0r[:-1]


def _valid(p: FloatArray) -> bool:
    return bool(p[0] > 0 and (np.diff(p) > 0).all())


def _coordinate_sweep(p: FloatArray, tail: Tail) -> FloatArray:
    """One red–black coordinate-descent sweep: every interior level moved to the exact minimiser of F along
    its coordinate (root of the increasing g_i, bracketed Newton iteration), odd then even indices."""
    p = p.copy()
    idx_all = np.arange(p.size - 1)
    for parity in (0, 1):
        idx = idx_all[idx_all % 2 == parity]
        if idx.size == 0:
            continue
        c = p[idx + 1]
        a_fixed = np.where(idx > 0, p[np.maximum(idx - 1, 0)], 0.0)
        first = idx == 0
        lo_b, hi_b = np.where(first, 0.0, a_fixed), c.copy()
        x = p[idx].copy()
        for _ in range(60):
            a = np.where(first, -x, a_fixed)
            m0l, m1l, _m = _interval_moments(tail, a, x)
            m0r, m1r, _m = _interval_moments(tail, x, c)
            g = (m1l - a * m0l) - (c * m0r - m1r)
            dg = (c - a) * np.asarray(tail.pdf(x), dtype=np.float64) + np.where(first, m0l, 0.0)
            lo_b = np.where(g < 0, x, lo_b)
            hi_b = np.where(g > 0, x, hi_b)
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = x - g / dg
            ok = (dg > 0) & (newton > lo_b) & (newton < hi_b)
            xn = np.where(g == 0, x, np.where(ok, newton, 0.5 * (lo_b + hi_b)))
            done = np.abs(xn - x) <= 1e-15 * np.abs(c)
            x = xn
            if done.all():
                break
        p[idx] = x
    return p


def _refine_positive(pos: FloatArray, tail: Tail, max_iter: int = 200) -> tuple[FloatArray, int]:
    """Minimise the exact rounding variance over the interior levels (α fixed, symmetry kept). Returns the
    refined positive half and the number of iterations. Never increases the exact variance."""
    from scipy.linalg import LinAlgError, solve_banded, solveh_banded

    p = np.asarray(pos, dtype=np.float64).copy()
    if p.size < 2:
        return p, 0
    f = _half_variance(p, tail)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        g, diag, off = _grad_hess(p, tail)
        n = g.size
        d: FloatArray | None = None
        with np.errstate(all="ignore"):
            if n == 1:
                d = -g / diag if diag[0] > 0 else None
            else:
                try:
                    ab = np.zeros((2, n))
                    ab[0, 1:] = off
                    ab[1] = diag
                    d = -solveh_banded(ab, g)
                except (LinAlgError, ValueError):
                    try:
                        ab3 = np.zeros((3, n))
                        ab3[0, 1:], ab3[1], ab3[2, :-1] = off, diag, off
                        d = -solve_banded((1, 1), ab3, g)
                    except (LinAlgError, ValueError):
                        d = None
        if d is None or not np.isfinite(d).all() or float(g @ d) >= 0:
            # scaled gradient step; zero curvature (a level in an empty stretch): the spacing sets the scale
            scale = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), np.diff(p) / (np.abs(g) + 1e-300))
            d = -g * scale
        t, accepted = 1.0, False
        for _ in range(50):
            cand = p.copy()
            cand[:-1] += t * d
            if _valid(cand):
                fc = _half_variance(cand, tail)
                if fc < f:
                    accepted = True
                    break
            t *= 0.5
        if accepted:
            step = float(np.max(np.abs(cand - p)))
            gain = f - fc
            p, f = cand, fc
            if step <= 1e-13 * p[-1] or gain <= 1e-15 * abs(f):
                break
        else:
            cand = _coordinate_sweep(p, tail)
            fc = _half_variance(cand, tail) if _valid(cand) else np.inf
            if not fc < f:
                break
            p, f = cand, fc
    return p, it


# ---------------------------------------------------------------------------------------------------------
def design(scheme: str, tail: Tail, bits: int, *, refine: bool = False) -> Design:
    """Optimal truncated-quantizer design for ``tail`` at ``bits`` bits (``s = 2^bits − 1``; SPEC §2, §3).

    ``scheme``: ``"tnq"`` (optimal non-uniform), ``"tuq"`` (uniform), ``"tbq"`` (bi-scaled).
    Closed forms: Laplace TNQ (SPEC §3.1), Laplace TUQ (Lambert W), power-law TNQ/TUQ (SPEC §3.2, including
    the ``α* < m`` branch). Numerical: every TBQ and every empirical design. ``refine=True`` (TNQ only; a
    note records it for TUQ/TBQ, whose grids stay uniform) moves the interior levels to minimise the exact
    rounding variance (SPEC §3.4: each coordinate problem is convex; solved jointly by a safeguarded Newton
    iteration on the tridiagonal stationarity system, with coordinate-descent sweeps as fallback), keeping
    the levels odd-symmetric and ``α`` fixed; ``predicted_mse`` stays the proxy at ``α*`` and the notes report
    the exact MSE before and after.

    Raises ``ValueError`` for an unknown ``scheme`` or ``bits`` outside 1..8, ``HeavyTailError`` for a power
    law with ``γ <= 3``.
    """
    scheme = _check_scheme(scheme)
    bits = _check_bits(bits)
    _check_tail(tail)
    s = 2**bits - 1
    beta: float | None = None
    s1: int | None = None
    s2: int | None = None
    notes: tuple[str, ...]
    if scheme == "tnq":
        if isinstance(tail, LaplaceTail):
            pos, mse, notes = _laplace_tnq(tail, s)
            method = "closed-form"
        elif isinstance(tail, PowerLawTail):
            pos, mse, notes = _powerlaw_tnq(tail, s)
            method = "closed-form"
        else:
            a_ref = _tuq_numeric(tail, s)
            alpha = _tnq_numeric(tail, s, a_ref)
            pos = _tnq_positive_levels(tail, s, alpha)
            mse = float(_tnq_objective(tail, s, alpha))
            method = "numerical"
            notes = (
                "empirical TNQ: grid + bounded Brent on (∫p^(1/3))³/(4s²) + B(alpha); levels invert the "
                "cumulative of p^(1/3)",
            )
    elif scheme == "tuq":
        if isinstance(tail, LaplaceTail):
            pos, mse, notes = _laplace_tuq(tail, s)
            method = "closed-form"
        elif isinstance(tail, PowerLawTail):
            pos, mse, notes = _powerlaw_tuq(tail, s)
            method = "closed-form"
        else:
            alpha = _tuq_numeric(tail, s)
            pos = alpha * np.arange(1, s + 1, 2, dtype=np.float64) / s
            pos[-1] = alpha
            mse = alpha**2 / s**2 + float(tail.truncation_error(alpha))
            method = "numerical"
            notes = ("empirical TUQ: root of d/dalpha [alpha²/s² + B(alpha)]",)
        notes = notes + ("TUQ proxy V = alpha²/s² (SPEC §3.2), without the P(|g| <= alpha) factor",)
    else:
        if isinstance(tail, LaplaceTail):
            a_ref = _laplace_tuq(tail, s)[0][-1]
        elif isinstance(tail, PowerLawTail):
            a_ref = _powerlaw_tuq(tail, s)[0][-1]
        else:
            a_ref = _tuq_numeric(tail, s)
        alpha, beta, s1, s2, mse = _tbq_numeric(tail, s, float(a_ref))
        pos = _tbq_levels(alpha, beta, s1, s2)
        method = "numerical"
        notes = (f"TBQ: grid over (s1, alpha, beta) + Nelder-Mead; s1={s1}, s2={s2}",)
    if refine:
        if scheme == "tnq":
            before = exact_mse(_from_positive(pos), tail)
            pos, iters = _refine_positive(pos, tail)
            after = exact_mse(_from_positive(pos), tail)
            notes = notes + (
                f"refined interior levels for the exact rounding variance: exact MSE {before:.6g} -> "
                f"{after:.6g} ({iters} Newton iterations); predicted_mse is the proxy at alpha*",
            )
        else:
            notes = notes + (
                f"refine ignored: {scheme.upper()} levels are (piecewise) uniform grids by definition",
            )
    levels = _from_positive(pos)
    if not (np.diff(levels) > 0).all():
        raise FloatingPointError(
            f"{scheme} design produced non-increasing levels for {tail!r} at bits={bits}"
        )
    levels.flags.writeable = False
    return Design(
        scheme=scheme,
        tail=tail,
        bits=bits,
        s=s,
        alpha=float(levels[-1]),
        levels=levels,
        predicted_mse=float(mse),
        method=method,
        notes=notes,
        beta=beta,
        s1=s1,
        s2=s2,
    )
