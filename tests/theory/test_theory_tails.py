"""Tail models: every closed form against scipy quadrature of the density (SPEC §3.1, §3.2, §3.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from tailq.theory import EmpiricalTail, LaplaceTail, LogHistogram, PowerLawTail


def quad(f, a, b, points=()):
    """∫_a^b f with the interval split at the given break points (a, b may be inf)."""
    cuts = sorted(p for p in points if a < p < b)
    edges = [a, *cuts, b]
    return sum(
        integrate.quad(f, lo, hi, epsabs=0.0, epsrel=1e-12, limit=400)[0]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    )


LAPLACE = [LaplaceTail(1.0), LaplaceTail(0.37), LaplaceTail(12.5)]
POWER = [PowerLawTail(m=0.8, gamma=4.5), PowerLawTail(m=1.0, gamma=3.5), PowerLawTail(m=2e-3, gamma=8.0)]


def _bps(tail):
    return (0.0, tail.m, -tail.m) if isinstance(tail, PowerLawTail) else (0.0,)


def _scale(tail):
    return tail.scale if isinstance(tail, LaplaceTail) else tail.m


@pytest.mark.parametrize("tail", LAPLACE + POWER, ids=repr)
def test_density_normalised_and_symmetric(tail):
    total = quad(tail.pdf, -np.inf, np.inf, _bps(tail))
    assert total == pytest.approx(1.0, rel=1e-10)
    x = np.linspace(0, 10, 41) * _scale(tail)
    np.testing.assert_array_equal(tail.pdf(x), tail.pdf(-x))


@pytest.mark.parametrize("tail", LAPLACE + POWER, ids=repr)
@pytest.mark.parametrize("r", [0.0, 0.3, 1.0, 2.5, 20.0])
def test_closed_forms_match_quadrature(tail, r):
    a = r * _scale(tail)
    bps = _bps(tail)
    p = tail.pdf
    # P(|g| <= a)
    assert tail.mass_within(a) == pytest.approx(2 * quad(p, 0, a, bps), rel=1e-10, abs=1e-15)
    # B(a) = E[(|g| − a)² 1{|g| > a}] (two-sided)
    b_quad = 2 * quad(lambda x: (x - a) ** 2 * p(x), a, np.inf, bps)
    assert tail.truncation_error(a) == pytest.approx(b_quad, rel=1e-9)
    # E[(|g| − a)_+]
    assert tail._excess1(a) == pytest.approx(2 * quad(lambda x: (x - a) * p(x), a, np.inf, bps), rel=1e-9)
    # ∫_{−a}^{a} p^{1/3}
    assert tail._cbrt_integral(a) == pytest.approx(
        2 * quad(lambda x: p(x) ** (1 / 3), 0, a, bps), rel=1e-9, abs=1e-15
    )
    # upper moments U_k(a) = ∫_a^∞ x^k p
    u = tail._upper_moments(a)
    for k in range(3):
        assert float(u[k]) == pytest.approx(quad(lambda x, k=k: x**k * p(x), a, np.inf, bps), rel=1e-9)


def test_laplace_truncation_error_formula():
    # B(α) = 2γ² e^{−α/γ}: at α = 0 it is E[g²] = 2γ² (the Laplace variance)
    t = LaplaceTail(1.7)
    assert t.truncation_error(0.0) == pytest.approx(2 * 1.7**2, rel=1e-15)
    assert t.truncation_error(3.4) == pytest.approx(2 * 1.7**2 * math.exp(-2.0), rel=1e-15)


def test_powerlaw_truncation_error_spec_formula_and_continuity():
    t = PowerLawTail(m=0.8, gamma=4.5)
    m, g = t.m, t.gamma
    for r in (1.0, 1.7, 10.0):
        spec = 2 * m * m / (g * (g - 2) * (g - 3)) * r ** (3 - g)  # SPEC §3.2
        assert t.truncation_error(r * m) == pytest.approx(spec, rel=1e-14)
    # the body branch (α < m) joins the tail branch continuously, and B(0) is the variance
    assert t.truncation_error(m * (1 - 1e-12)) == pytest.approx(t.truncation_error(m), rel=1e-9)
    var = 2 * quad(lambda x: x * x * t.pdf(x), 0, np.inf, (m,))
    assert t.truncation_error(0.0) == pytest.approx(var, rel=1e-10)


def test_powerlaw_heavy_tail_has_infinite_truncation_error():
    t = PowerLawTail(m=1.0, gamma=2.5)
    assert np.isinf(t.truncation_error(3.0))


def test_powerlaw_companding_inverse():
    t = PowerLawTail(m=0.8, gamma=4.5)
    x = np.geomspace(1e-3, 1e4, 50)
    np.testing.assert_allclose(t._h_inv(t._h(x)), x, rtol=1e-10)
    # h is the normalised cumulative of p^{1/3}: ∫_0^x p^{1/3} = C^{1/3} m h(x)
    for xx in (0.3, 0.8, 5.0):
        q = quad(lambda v: t.pdf(v) ** (1 / 3), 0, xx, (t.m,))
        assert t.c ** (1 / 3) * t.m * t._h(xx) == pytest.approx(q, rel=1e-10)


@pytest.mark.parametrize("tail", LAPLACE[:2] + POWER[:2], ids=repr)
def test_sample_follows_model(tail):
    rng = np.random.default_rng(1)
    x = tail.sample(40_000, rng)
    assert x.shape == (40_000,)
    res = stats.kstest(np.abs(x), lambda a: tail.mass_within(np.maximum(a, 0)))
    assert res.statistic < 1.36 / math.sqrt(x.size)  # 95% KS critical value
    assert abs(np.mean(x > 0) - 0.5) < 4 * 0.5 / math.sqrt(x.size)


# --- empirical ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_hist():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.laplace(0, 0.2, 3000), np.zeros(40), rng.standard_t(3.5, 200) * 5])
    return LogHistogram.from_samples(x)


@pytest.mark.parametrize("density", ["linear", "uniform"])
def test_empirical_integrals_are_exact(small_hist, density):
    t = EmpiricalTail(small_hist, density)
    pts = np.unique(np.concatenate([t.lo, t.hi]))
    pts = tuple(pts[(pts > 1e-6)])  # the tiny bins below 1e-6 carry no mass in this sample
    p = t.pdf
    top = t.max_abs
    assert 2 * quad(p, 0, top, pts) + t.mass[0] * (t.lo[0] == 0) == pytest.approx(1.0, rel=1e-9)
    for a in (0.05, 0.31, 1.7, 9.0):
        assert t.mass_within(a) == pytest.approx(2 * quad(p, 0, a, pts) + t.mass[0], rel=1e-9)
        assert t.truncation_error(a) == pytest.approx(
            2 * quad(lambda x, a=a: (x - a) ** 2 * p(x), a, top, pts), rel=1e-9
        )
        assert t._excess1(a) == pytest.approx(2 * quad(lambda x, a=a: (x - a) * p(x), a, top, pts), rel=1e-9)
        u = t._upper_moments(a)
        for k in range(3):
            assert float(u[k]) == pytest.approx(quad(lambda x, k=k: x**k * p(x), a, top, pts), rel=1e-9)
        cb = 2 * quad(lambda x: p(x) ** (1 / 3), 1e-6, a, pts)
        assert t._cbrt_integral(a) - t._cbrt_integral(1e-6) == pytest.approx(cb, rel=1e-8)
    # the inverse of the p^{1/3} cumulative is exact
    y = np.linspace(0, float(t._cbrt_cumulative(top)), 33)
    np.testing.assert_allclose(t._cbrt_cumulative(t._cbrt_cumulative_inverse(y)), y, rtol=1e-10, atol=1e-14)


def test_empirical_linear_density_keeps_bin_means(small_hist):
    t = EmpiricalTail(small_hist, "linear")
    keep = small_hist.counts > 0
    mu = small_hist.sum_abs[keep] / small_hist.counts[keep]
    w = t.hi - t.lo
    # bin mean of the model: lo + w(1/2 + k/6); exact wherever the recorded mean is attainable
    model_mean = t.lo + w * (0.5 + t._k / 6)
    attainable = (mu >= t.lo + w / 3) & (mu <= t.hi - w / 3)
    assert attainable.sum() > 10
    np.testing.assert_allclose(model_mean[attainable], mu[attainable], rtol=1e-12)
    assert (t.f_lo >= 0).all() and (t.f_lo + t.slope * w >= 0).all()


def test_empirical_sample_follows_model(small_hist):
    t = EmpiricalTail(small_hist)
    x = t.sample(40_000, np.random.default_rng(3))
    res = stats.kstest(np.abs(x), lambda a: t.mass_within(np.maximum(a, 0)))
    assert res.statistic < 1.36 / math.sqrt(x.size)


def test_empirical_truncation_error_tracks_laplace_tail():
    # the mean-matched linear bins fix the bias of uniform bins in the exponential tail (SPEC §3.4)
    lap = LaplaceTail(1.0)
    h = LogHistogram.from_samples(lap.sample(1_000_000, np.random.default_rng(0)))
    lin, uni = EmpiricalTail(h, "linear"), EmpiricalTail(h, "uniform")
    for a in (1.0, 2.0, 4.0, 6.0):
        assert lin.truncation_error(a) / lap.truncation_error(a) == pytest.approx(1.0, abs=0.05)
    assert (
        uni.truncation_error(6.0) / lap.truncation_error(6.0) > 1.15
    )  # documented bias of the uniform model


# --- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_laplace_scale_validation(bad):
    with pytest.raises(ValueError, match="scale"):
        LaplaceTail(bad)


@pytest.mark.parametrize(
    ("m", "gamma", "name"),
    [
        (0.0, 4.0, "`m`"),
        (-1, 4.0, "`m`"),
        (1.0, 1.0, "`gamma`"),
        (1.0, 0.5, "`gamma`"),
        (1.0, float("nan"), "`gamma`"),
    ],
)
def test_powerlaw_validation(m, gamma, name):
    with pytest.raises(ValueError, match=name):
        PowerLawTail(m=m, gamma=gamma)


def test_empirical_validation():
    with pytest.raises(ValueError, match="empty"):
        EmpiricalTail(LogHistogram.empty())
    with pytest.raises(ValueError, match="zero bin"):
        EmpiricalTail(LogHistogram.from_samples(np.zeros(10)))
    with pytest.raises(ValueError, match="density"):
        EmpiricalTail(LogHistogram.from_samples([1.0, 2.0]), "cubic")
    with pytest.raises(TypeError):
        EmpiricalTail(np.ones(5))


def test_negative_threshold_rejected():
    with pytest.raises(ValueError, match="alpha"):
        LaplaceTail(1.0).truncation_error(-0.1)
    with pytest.raises(ValueError, match="`a`"):
        PowerLawTail(1.0, 4.0).mass_within(np.array([1.0, -2.0]))
