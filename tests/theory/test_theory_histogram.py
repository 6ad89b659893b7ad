"""Mergeable log histogram: the layout contract of SPEC §3.4 / §6."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tailq.theory import (
    HIST_BINS_PER_OCTAVE,
    HIST_HI,
    HIST_K,
    HIST_LO,
    HIST_NBINS,
    HIST_STATS_LEN,
    LogHistogram,
    hist_bin_index,
    hist_edges,
)


def test_layout_constants():
    assert HIST_LO == 2.0**-40 and HIST_HI == 2.0**16
    assert HIST_BINS_PER_OCTAVE == 4 and HIST_K == 224
    assert HIST_NBINS == 226 and HIST_STATS_LEN == 3 * 226
    e = hist_edges()
    assert e.shape == (HIST_K + 1,)
    assert e[0] == HIST_LO and e[-1] == HIST_HI
    np.testing.assert_allclose(e[1:] / e[:-1], 2.0**0.25, rtol=1e-15)
    # powers of two are exact edges
    np.testing.assert_array_equal(e[::4], 2.0 ** np.arange(-40, 17))


def test_bin_index():
    e = hist_edges()
    mid = np.sqrt(e[:-1] * e[1:])  # geometric centre of bins 1..K
    np.testing.assert_array_equal(hist_bin_index(mid), np.arange(1, HIST_K + 1))
    np.testing.assert_array_equal(hist_bin_index(-mid), np.arange(1, HIST_K + 1))
    # exact powers of two start their bin: 2^e is in bin 4(e + 40) + 1
    ex = np.arange(-40, 16)
    np.testing.assert_array_equal(hist_bin_index(2.0**ex), 4 * (ex + 40) + 1)
    assert hist_bin_index(0.0) == 0
    assert hist_bin_index(HIST_LO * (1 - 2**-30)) == 0
    assert hist_bin_index(HIST_HI) == HIST_K + 1
    assert hist_bin_index(1e30) == HIST_K + 1
    assert hist_bin_index(np.inf) == HIST_K + 1
    with pytest.raises(ValueError, match="NaN"):
        hist_bin_index([1.0, np.nan])


def test_from_samples_statistics():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_cauchy(5000), np.zeros(7), [1e-45, -3e5]])
    h = LogHistogram.from_samples(x)
    a = np.abs(x)
    idx = hist_bin_index(a)
    assert h.n == x.size
    assert h.counts[0] == 8  # 7 zeros + 1e-45
    assert h.counts[HIST_K + 1] == np.sum(a >= HIST_HI)
    for j in np.unique(idx):
        sel = idx == j
        assert h.counts[j] == sel.sum()
        assert h.sum_abs[j] == pytest.approx(a[sel].sum(), rel=1e-12)
        expect_log = 0.0 if j == 0 else np.log(a[sel]).sum()
        assert h.sum_log[j] == pytest.approx(expect_log, rel=1e-12, abs=1e-12)
    # within-bin: lo <= |g| < hi
    e = hist_edges()
    nz = (idx >= 1) & (idx <= HIST_K)
    assert np.all(a[nz] >= e[idx[nz] - 1]) and np.all(a[nz] < e[idx[nz]])
    assert h.mean_abs == pytest.approx(a.mean(), rel=1e-12)


def test_merge_equals_histogram_of_concatenation():
    rng = np.random.default_rng(1)
    x, y = rng.laplace(0, 0.01, 20_000), rng.standard_t(3, 7_000)
    hx, hy, hxy = (
        LogHistogram.from_samples(x),
        LogHistogram.from_samples(y),
        LogHistogram.from_samples(np.r_[x, y]),
    )
    m = hx + hy
    np.testing.assert_array_equal(m.counts, hxy.counts)
    np.testing.assert_allclose(m.sum_abs, hxy.sum_abs, rtol=1e-13)
    np.testing.assert_allclose(m.sum_log, hxy.sum_log, rtol=1e-13, atol=1e-9)
    np.testing.assert_array_equal(m.to_stats(), hx.to_stats() + hy.to_stats())
    np.testing.assert_array_equal(hx.merge(LogHistogram.empty()).to_stats(), hx.to_stats())


def test_merge_exact_for_dyadic_samples():
    # values k·2^-10 with small k: every partial sum is exact in float64, so merge == concat bit for bit
    rng = np.random.default_rng(2)
    x = rng.integers(-4000, 4000, 3000) * 2.0**-10
    y = rng.integers(-4000, 4000, 2000) * 2.0**-10
    m = LogHistogram.from_samples(x) + LogHistogram.from_samples(y)
    c = LogHistogram.from_samples(np.r_[x, y])
    np.testing.assert_array_equal(m.counts, c.counts)
    np.testing.assert_array_equal(m.sum_abs, c.sum_abs)


def test_stats_round_trip():
    h = LogHistogram.from_samples(np.random.default_rng(3).normal(size=1000))
    v = h.to_stats()
    assert v.dtype == np.float64 and v.shape == (HIST_STATS_LEN,)
    h2 = LogHistogram.from_stats(v)
    np.testing.assert_array_equal(h2.to_stats(), v)
    assert h2.sum_log[0] == 0.0


def test_bad_stats_vectors():
    v = LogHistogram.from_samples([0.5, -1.0, 3.0, 0.0]).to_stats()
    with pytest.raises(ValueError, match="HIST_STATS_LEN"):
        LogHistogram.from_stats(v[:-1])
    bad = v.copy()
    bad[5] = -1.0
    with pytest.raises(ValueError, match="counts must be >= 0"):
        LogHistogram.from_stats(bad)
    bad = v.copy()
    bad[HIST_NBINS + 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        LogHistogram.from_stats(bad)
    bad = v.copy()
    bad[2 * HIST_NBINS] = 1.5  # sum_log of the zero bin
    with pytest.raises(ValueError, match="zero bin"):
        LogHistogram.from_stats(bad)
    bad = v.copy()
    empty_bin = int(np.flatnonzero(v[:HIST_NBINS] == 0)[3])
    bad[HIST_NBINS + empty_bin] = 2.0
    with pytest.raises(ValueError, match="count 0"):
        LogHistogram.from_stats(bad)
    with pytest.raises(TypeError):
        LogHistogram.from_samples([1.0]).merge(v)


def test_from_samples_rejects_non_finite():
    with pytest.raises(ValueError, match=r"`x`.*1 NaN and 2 Inf"):
        LogHistogram.from_samples([1.0, np.nan, np.inf, -np.inf])


def test_max_abs_bound():
    rng = np.random.default_rng(4)
    for x in (rng.laplace(size=1000), rng.standard_cauchy(1000) * 1e3, np.array([7e4, 9e4, 1.2e5])):
        h = LogHistogram.from_samples(x)
        bound = h.max_abs_bound
        assert bound >= np.abs(x).max()
        j = int(np.flatnonzero(h.counts)[-1])
        if j <= HIST_K:
            assert bound <= hist_edges()[j]
    single = LogHistogram.from_samples([1e5])  # overflow bin with one sample: the bound is the sample itself
    assert single.max_abs_bound == pytest.approx(1e5, rel=1e-9)
    assert LogHistogram.from_samples(np.zeros(3)).max_abs_bound == HIST_LO
    assert LogHistogram.empty().max_abs_bound == 0.0


def test_overflow_model_is_mean_preserving():
    h = LogHistogram.from_samples([7e4, 1e5])
    assert 0.5 * (HIST_HI + h.overflow_top) == pytest.approx(8.5e4, rel=1e-12)
    assert math.isfinite(LogHistogram.from_samples([HIST_HI]).overflow_top)
