"""Fitting: Laplace MLE and Clauset–Shalizi–Newman power-law fits, raw and from histograms.

SPEC §3.1, §3.2.
"""

from __future__ import annotations

import numpy as np
import pytest

from tailq.theory import (
    LaplaceTail,
    LogHistogram,
    PowerLawFit,
    PowerLawTail,
    fit_laplace,
    fit_powerlaw,
    fit_powerlaw_hist,
    hist_edges,
    laplace_from_hist,
)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 37.0])
def test_fit_laplace(scale):
    x = LaplaceTail(scale).sample(1_000_000, np.random.default_rng(0))
    fit = fit_laplace(x)
    assert isinstance(fit, LaplaceTail)
    assert fit.scale == pytest.approx(scale, rel=0.01)
    assert fit.scale == pytest.approx(np.abs(x).mean(), rel=1e-13)
    assert laplace_from_hist(LogHistogram.from_samples(x)).scale == pytest.approx(fit.scale, rel=1e-12)


@pytest.fixture(scope="module", params=[3.5, 4.0, 5.0])
def powerlaw_sample(request):
    g = request.param
    m = 0.01
    x = PowerLawTail(m=m, gamma=g).sample(1_000_000, np.random.default_rng(int(g * 10)))
    return m, g, x


def test_fit_powerlaw_raw(powerlaw_sample):
    m, g, x = powerlaw_sample
    fit = fit_powerlaw(x)
    assert isinstance(fit, PowerLawFit)
    assert fit.gamma == pytest.approx(g, rel=0.05)
    assert 0.5 * m <= fit.m <= 2.5 * m
    assert fit.n == x.size and 50 <= fit.n_tail <= x.size
    assert fit.ks < 0.01
    assert fit.tail == PowerLawTail(m=fit.m, gamma=fit.gamma)
    # γ̂ is the MLE at the chosen m
    t = np.abs(x)[np.abs(x) >= fit.m]
    assert fit.gamma == pytest.approx(1 + t.size / np.log(t / fit.m).sum(), rel=1e-10)
    assert fit.n_tail == t.size


def test_fit_powerlaw_hist(powerlaw_sample):
    m, g, x = powerlaw_sample
    fit = fit_powerlaw_hist(LogHistogram.from_samples(x))
    assert fit.gamma == pytest.approx(g, rel=0.05)
    assert 0.5 * m <= fit.m <= 2.5 * m
    assert fit.m in set(hist_edges())


def test_fit_powerlaw_hist_is_exact_given_the_statistics():
    rng = np.random.default_rng(5)
    x = PowerLawTail(m=0.3, gamma=4.2).sample(200_000, rng)
    h = LogHistogram.from_samples(x)
    fit = fit_powerlaw_hist(h)
    a = np.abs(x)
    tail = np.sort(a[a >= fit.m])
    assert fit.n_tail == tail.size
    assert fit.gamma == pytest.approx(1 + tail.size / np.log(tail / fit.m).sum(), rel=1e-11)
    # KS measured at the bin edges above m, from the raw samples
    e = hist_edges()
    e = e[(e > fit.m) & (e <= tail.max() * 2**0.25 + 1e-300)]
    f_emp = np.searchsorted(tail, e, side="left") / tail.size
    f_par = 1 - (e / fit.m) ** (1 - fit.gamma)
    assert fit.ks == pytest.approx(np.max(np.abs(f_emp - f_par)), rel=1e-9)
    # merging the histograms of two halves gives the same fit
    h2 = LogHistogram.from_samples(x[:77_777]) + LogHistogram.from_samples(x[77_777:])
    fit2 = fit_powerlaw_hist(h2)
    assert fit2.m == fit.m and fit2.gamma == pytest.approx(fit.gamma, rel=1e-12)


def test_fit_powerlaw_custom_quantiles_and_min_tail():
    x = PowerLawTail(m=1.0, gamma=4.0).sample(20_000, np.random.default_rng(9))
    fit = fit_powerlaw(x, quantiles=[0.9], min_tail=10)
    assert fit.m == pytest.approx(np.quantile(np.abs(x), 0.9), rel=1e-3)
    with pytest.raises(ValueError, match="min_tail"):
        fit_powerlaw(x[:30], min_tail=50)
    with pytest.raises(ValueError, match="quantiles"):
        fit_powerlaw(x, quantiles=[1.5])


@pytest.mark.parametrize("fitter", [fit_laplace, fit_powerlaw])
def test_fit_input_errors(fitter):
    with pytest.raises(ValueError, match=r"`x`.*40 NaN and 20 Inf of 100"):
        fitter(np.array([1.0, np.nan, 2.0, np.nan, np.inf] * 20))
    with pytest.raises(ValueError, match="empty"):
        fitter(np.array([]))
    with pytest.raises(ValueError, match="all zeros"):
        fitter(np.zeros(1000))


def test_hist_fit_errors():
    with pytest.raises(ValueError, match="empty"):
        laplace_from_hist(LogHistogram.empty())
    with pytest.raises(ValueError, match="zeros"):
        laplace_from_hist(LogHistogram.from_samples(np.zeros(5)))
    with pytest.raises(ValueError, match="empty"):
        fit_powerlaw_hist(LogHistogram.empty())
    with pytest.raises(ValueError, match="min_tail"):
        fit_powerlaw_hist(LogHistogram.from_samples(np.arange(1.0, 40.0)))
