"""The empirical design at every scale a float32 carries: the histogram's octave shift.

The |g| histogram has fixed bins 2^-40 … 2^16. A bucket far outside them is binned as |g|·2^-s (s an integer the
ranks share) and the design scaled back by 2^s. Checked here:

* the rule (:func:`hist_in_range`, :func:`hist_shift`) on histograms whose answer is known in closed form;
* the shifted statistics are the histogram of |x|·2^-s, bit for bit on the reference and the fused CPU kernel,
  and shift 0 is the statistics of the code before the shift existed (a verbatim copy of that function below);
* for in-range data the codebook is bit-identical to the one the pre-shift pipeline builds;
* a design is exactly equivariant under octave scalings 2^k (|k| up to 100): levels(2^k·x) = 2^k·levels(x);
* the NMSE of tuq/tnq/tbq on heavy-tailed data is the same at 1e-36 … 3e38 as at 1: |m_s − m_1| ≤ 4·√(se_s² + se_1²)
  with se the Monte-Carlo standard error over independent trials (before the shift: 5800 at 1e-15, 0.35 instead
  of 0.19 at 1e4);
* on 2 Gloo ranks every policy (every step, stale, redesign every 2) lands on the same codebook on every rank,
  equal to the design of the summed statistics at any in-range shift, re-agrees once per jump out of range and
  never in steady state.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tailq
from tailq import theory
from tailq.codec.stats import histogram_stats
from tailq.codec.tq import _cap_to_data
from tailq.kernels import cpu as kcpu
from tailq.kernels import dispatch, use
from tailq.theory import (
    HIST_BINS_PER_OCTAVE,
    HIST_FIT_LO,
    HIST_K,
    HIST_LO,
    HIST_NBINS,
    LogHistogram,
    hist_in_range,
    hist_shift,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from workers import FakeBucket, launch  # noqa: E402

SCHEMES = ("tuq", "tnq", "tbq")
_LOG2_LO = math.log2(HIST_LO)


def old_histogram_stats(x: torch.Tensor, with_logs: bool = True) -> torch.Tensor:
    """``tailq.codec.stats.histogram_stats`` as it was before the octave shift (verbatim)."""
    a = x.reshape(-1).abs().to(torch.float64)
    nonzero = a >= HIST_LO
    la = torch.where(nonzero, torch.log2(a.clamp_min(HIST_LO)), torch.zeros_like(a))
    idx = torch.floor((la - _LOG2_LO) * HIST_BINS_PER_OCTAVE).to(torch.int64) + 1
    idx = torch.where(nonzero, idx.clamp_(1, HIST_K + 1), torch.zeros_like(idx))
    counts = torch.bincount(idx, minlength=HIST_NBINS).to(torch.float64)
    sum_abs = torch.bincount(idx, weights=a, minlength=HIST_NBINS)
    if not with_logs:
        return torch.cat([counts, sum_abs]).to(torch.float32)
    sum_log = torch.bincount(idx, weights=la * math.log(2.0), minlength=HIST_NBINS)
    return torch.cat([counts, sum_abs, sum_log])


def t3(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(3.0, n)


def f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


# ------------------------------------------------------------------------------------------------- the rule
def test_in_range_data_keeps_shift_zero_and_a_small_drift_keeps_any_shift() -> None:
    h = LogHistogram.from_samples(t3(10_000, 0))  # max|g| ≈ 30: in [2^-12, 2^12)
    assert hist_in_range(h) and hist_shift(h, 0) == 0 and hist_shift(h, 40) == 40 and hist_shift(h, -70) == -70
    zeros = LogHistogram.from_samples(np.zeros(100))
    assert hist_in_range(zeros) and hist_shift(zeros, 7) == 7 and hist_in_range(LogHistogram.empty())
    # in the window [2^-16, 2^16) but outside [2^-12, 2^12): no re-binning needed, the next shift recentres
    big = LogHistogram.from_samples(np.array([2.0**13 * 1.5, 3.0, -1.0]))
    assert hist_in_range(big) and hist_shift(big, 0) == 13  # max bins into [1, 2) at shift 13
    assert hist_shift(big, -10) == 0  # absolute max 1.5·2^3: back to today's binning


@pytest.mark.parametrize("k", [-30, -60, -100])
def test_small_buckets_are_shifted_to_their_max_octave(k: int) -> None:
    x = t3(10_000, 1)
    m = np.abs(x).max()
    h = LogHistogram.from_samples(x * 2.0**k)
    assert not hist_in_range(h)  # max|g| ≈ 2^(k+5) < 2^-16 (k = -100: every sample in the zero bin)
    s = hist_shift(h, 0)
    if k > -40 - 8:  # the top bin is a regular one: max|g| is known within a quarter octave
        assert s == math.floor(math.log2(m * 2.0**k))
    rebinned = LogHistogram.from_samples(x * 2.0 ** (k - s))
    assert hist_in_range(rebinned)
    assert HIST_FIT_LO <= np.abs(x).max() * 2.0 ** (k - s) < 2.0**13


def test_the_loose_bound_of_an_overflowing_bucket_needs_one_rebinning_up_to_2_to_the_28_samples() -> None:
    """c samples all at 2^20 (the worst case: the bound S − (c − 1)·HI overestimates max|g| by up to c): the new
    shift puts the bound in [2^12, 2^13), so max|g| lands at 2^12 / c ≥ 2^-16 for c ≤ 2^28."""
    c = 2.0**28
    counts, sums = np.zeros(HIST_NBINS), np.zeros(HIST_NBINS)
    counts[HIST_K + 1], sums[HIST_K + 1] = c, c * 2.0**20
    h = LogHistogram(counts, sums, np.zeros(HIST_NBINS))
    assert not hist_in_range(h)
    s = hist_shift(h, 0)
    assert 2.0**12 <= h.max_abs_bound * 2.0**-s < 2.0**13
    assert 2.0**20 * 2.0**-s >= HIST_FIT_LO
    assert hist_in_range(LogHistogram.from_samples(np.full(3, 2.0 ** (20 - s))))


# -------------------------------------------------------------------------------------------- statistics
def _specials() -> torch.Tensor:
    rng = np.random.default_rng(5)
    body = rng.standard_cauchy(50_000) * 1e-3
    sub = np.arange(1, 300, dtype=np.uint32).view(np.float32).astype(np.float64)  # subnormals
    edges = theory.hist_edges()
    extra = np.concatenate([[0.0, 2.0**-126, 3.4e38, 1e-30, 1e30], edges, np.nextafter(edges, 0), sub,
                            np.ldexp(edges, 60), np.ldexp(edges, -80)])
    return f32(np.concatenate([body, extra, -extra]))


@pytest.mark.parametrize("shift", [-86, -60, -1, 0, 1, 17, 60, 115])
def test_shifted_statistics_are_the_histogram_of_the_shifted_magnitudes_on_every_path(shift: int) -> None:
    x = _specials()
    ref = histogram_stats(x, with_logs=False, shift=shift)
    got, bad = kcpu.histogram_stats(x, shift)
    assert bad == 0 and got.dtype == ref.dtype and torch.equal(got, ref)
    a = x.double().abs() * 2.0**-shift  # exact: a power of two, within float64's range
    want = LogHistogram.from_samples(a.numpy())
    np.testing.assert_array_equal(ref[:HIST_NBINS].numpy(), want.counts.astype(np.float32))
    with np.errstate(over="ignore"):  # at shift <= 0 the overflow bin's Σ (3.4e38 + …) is inf in float32 on both
        np.testing.assert_array_equal(ref[HIST_NBINS:].numpy(), want.sum_abs.astype(np.float32))
    logs = histogram_stats(x, with_logs=True, shift=shift)
    np.testing.assert_allclose(logs[2 * HIST_NBINS:].numpy(), want.sum_log, rtol=1e-12, atol=1e-9)
    comp = tailq.compressor("tnq")
    with use("reference"):
        st = comp.local_stats(x, shift)
    with use("compiled"):
        st2 = comp.local_stats(x, shift)
    assert torch.equal(st, st2) and torch.equal(st, ref)


def test_shift_zero_is_the_old_statistics_and_kernel_limits_are_refused() -> None:
    x = _specials()
    for logs in (False, True):
        assert torch.equal(histogram_stats(x, with_logs=logs), old_histogram_stats(x, with_logs=logs))
    assert torch.equal(kcpu.histogram_stats(x)[0], old_histogram_stats(x, with_logs=False))
    # below -86 a subnormal could leave the zero bin: the kernel refuses, the dispatcher uses the reference
    with pytest.raises(ValueError, match="shift must be >= -86"):
        kcpu.histogram_stats(x, -87)
    with use("compiled"):
        assert dispatch.histogram_stats(x, -87) is None
        assert torch.equal(tailq.compressor("tnq").local_stats(x, -87), histogram_stats(x, False, shift=-87))
    with pytest.raises(ValueError, match="tail='laplace' statistics are scale-free, so shift must be 0"):
        tailq.compressor("tnq", tail="laplace").local_stats(x, 3)
    with pytest.raises(ValueError, match=r"shift must be in \[-300, 300\]"):
        tailq.compressor("tnq").codebook(histogram_stats(x, False), 400)


# ------------------------------------------------------------------------------------------------ designs
def _old_levels(comp: Any, x: torch.Tensor) -> torch.Tensor:
    """The codebook levels the pre-shift pipeline built for ``x`` (stats → LogHistogram → design → cap)."""
    stats = old_histogram_stats(x, with_logs=comp.tail == "powerlaw").double().numpy()
    if stats.size == 2 * HIST_NBINS:
        stats = np.concatenate([stats, np.zeros(HIST_NBINS)])
    hist = LogHistogram.from_stats(stats)
    if comp.tail == "powerlaw":
        tail: Any = theory.fit_powerlaw_hist(hist).tail
        des = theory.design(comp.scheme, tail, comp.bits)
    else:
        tail = theory.EmpiricalTail(hist)
        des = theory.design(comp.scheme, tail, comp.bits, refine=False)
    levels, _ = _cap_to_data(des, tail, hist)
    return tailq.Codebook.from_levels(levels, uniform=comp.scheme == "tuq").levels


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tail", ["empirical", "powerlaw"])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 100.0])
def test_in_range_codebooks_are_bit_identical_to_before(scheme: str, tail: str, scale: float) -> None:
    comp = tailq.compressor(scheme, bits=3, tail=tail)
    x = f32(t3(20_000, 2) * scale)  # max|x| ≈ 35·scale: inside [2^-16, 2^16)
    enc = comp.encode(x, generator=torch.Generator().manual_seed(0))
    assert enc.info["shift"] == 0 and enc.info["rebinned"] == 0
    cb = comp.local_codebook(x)
    assert cb is not None
    want = _old_levels(comp, x)
    assert torch.equal(cb.levels, want)
    sent = enc.tensors["levels"] if "levels" in enc.tensors else enc.tensors["alpha"]
    assert torch.equal(sent, want if "levels" in enc.tensors else want[-1:])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_designs_are_equivariant_under_octave_scalings(scheme: str) -> None:
    comp = tailq.compressor(scheme, bits=3)
    x = f32(t3(8192, 3))
    base = comp.local_codebook(x)
    assert base is not None
    for k in (-100, -60, -45, 20, 40, 100):
        res, shift, rebins = comp.local_design(x * 2.0**k)
        assert rebins == 1 and shift != 0 and res.fallback is None, (k, shift, rebins, res.fallback)
        assert res.codebook is not None
        torch.testing.assert_close(res.codebook.levels.double(), base.levels.double() * 2.0**k, rtol=1e-6, atol=0)


def _nmse_trials(comp: Any, scale: float | str, trials: int, d: int) -> np.ndarray:
    out = []
    for t in range(trials):
        b = t3(d, 100 + t)
        x = f32(b / np.abs(b).max() * 3.0e38 if scale == "max" else b * scale)
        q = comp.decode(comp.encode(x, generator=torch.Generator().manual_seed(1000 * t + 7))).double()
        xd = x.double()
        out.append(float(((q - xd) ** 2).sum() / (xd**2).sum()))
    return np.array(out)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nmse_is_the_same_at_every_float32_scale(scheme: str) -> None:
    comp = tailq.compressor(scheme, bits=3)
    trials, d = 12, 8192
    ref = _nmse_trials(comp, 1.0, trials, d)
    se_ref = ref.std(ddof=1) / math.sqrt(trials)
    for scale in (1e-36, 1e-15, 1e-12, 1e4, 1e6, 1e30, "max"):
        v = _nmse_trials(comp, scale, trials, d)
        tol = 4.0 * math.hypot(se_ref, v.std(ddof=1) / math.sqrt(trials))
        assert abs(v.mean() - ref.mean()) <= tol, (scale, v.mean(), ref.mean(), tol)


def test_encode_reports_the_shift_and_rebins_once_at_any_scale() -> None:
    comp = tailq.compressor("tnq", bits=3)
    b = t3(4096, 9)
    for scale in (1e-36, 1e-15, 1e-12, 1e5, 1e30, 3e38 / np.abs(b).max()):
        info = comp.encode(f32(b * scale)).info
        assert info["rebinned"] == 1 and info["shift"] != 0 and "fallback" not in info, (scale, info)
        assert 2.0**-16 <= np.abs(b).max() * scale * 2.0 ** -info["shift"] < 2.0**16
    assert comp.encode(f32(b)).info["shift"] == 0 and comp.encode(f32(b)).info["rebinned"] == 0
    assert "shift" not in tailq.compressor("tnq", tail="laplace").encode(f32(b * 1e-15)).info


# ---------------------------------------------------------------------------------------------- 2 ranks
PLAN = [1.0, 1.0, 2.0**-60, 2.0**-60, 1e-15, 1e30]
D_RANK = 4096


def _rank_data(rank: int) -> torch.Tensor:
    return f32(t3(D_RANK, 300 + rank))


def w_range(rank: int, world: int, opts: dict[str, Any]) -> dict[str, Any]:
    from tailq.hooks.tailq_hook import TailqState

    state = TailqState("tnq", bits=3, warmup_steps=0, min_bucket=0, seed=3, **opts)
    g = _rank_data(rank)
    out: dict[str, Any] = {"levels": [], "rebins": [], "results": [], "stats_calls": []}
    for step, scale in enumerate(PLAN):
        x = (g.double() * scale).float()
        res = state.process(FakeBucket(x.clone()))
        info = state.metrics.last[0]
        out["levels"].append(info["levels"].clone())
        out["rebins"].append(state.policy.rebins)
        out["results"].append(res.clone())
        out["stats_calls"].append(sum(1 for r in state.metrics.wire.records if r.kind == "stats" and r.step == step))
    out["shifts"] = dict(state.state_dict()["shifts"])
    state.close()
    return out


def _agreed_levels(scale: float) -> torch.Tensor:
    """The codebook of both ranks' summed statistics (float32 a + b, as a 2-rank all-reduce) at an in-range shift."""
    comp = tailq.compressor("tnq", bits=3)
    xs = [(_rank_data(r).double() * scale).float() for r in (0, 1)]
    shift = 0
    for _ in range(3):
        st = comp.local_stats(xs[0], shift) + comp.local_stats(xs[1], shift)
        new = comp.rebin_shift(st, shift)
        if new is None:
            cb = comp.codebook(st, shift)
            assert cb is not None
            return cb.levels
        shift = new
    raise AssertionError("no in-range shift found")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["every", "stale", "redesign", "twophase"])
def test_two_ranks_agree_one_codebook_at_every_scale_and_rebin_only_on_a_jump(mode: str) -> None:
    opts = {"every": {"route": "allgather"}, "stale": {"route": "allgather", "stale_stats": True},
            "redesign": {"route": "allgather", "redesign_every": 2}, "twophase": {"route": "twophase"}}[mode]
    r0, r1 = launch(w_range, 2, opts)
    for a, b in zip(r0["levels"] + r0["results"], r1["levels"] + r1["results"], strict=True):
        assert torch.equal(a, b)  # every rank: the same codebook and the same mean, bit for bit
    lv = r0["levels"]
    fresh = {s: _agreed_levels(s) for s in set(PLAN)}

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=0)

    if mode in ("every", "twophase"):
        for step, s in enumerate(PLAN):
            close(lv[step], fresh[s])
        close(lv[2], lv[0] * 2.0**-60)  # octave equivariance through the agreement
        assert r0["rebins"] == [0, 0, 1, 1, 1, 2]  # a re-agreement on each jump out of range, none in between
        assert r0["stats_calls"] == [1, 1, 2, 1, 1, 2]
    elif mode == "stale":
        close(lv[2], fresh[1.0])  # step 2 still designs from step 1's statistics
        for step in (3, 4):
            close(lv[step], fresh[2.0**-60])  # step 3: step 2's statistics fell out of range: agreed blocking
        close(lv[5], fresh[1e-15])
        assert r0["rebins"] == [0, 0, 0, 1, 1, 1] and r0["stats_calls"] == [1] * 6
    else:  # redesign every 2: designs on steps 0, 2, 4; in between the kept design rescaled by Σ|g|
        for step in (0, 2, 4):
            close(lv[step], fresh[PLAN[step]])
        ratio = 1e30 / 1e-15
        torch.testing.assert_close(lv[5].double(), lv[4].double() * ratio, rtol=2e-6, atol=0)
        assert r0["rebins"] == [0, 0, 1, 1, 1, 1]
    # the hooked mean is as accurate at 2^-60 (a pure octave scaling of step 0's data) as at scale 1
    assert r0["shifts"] == r1["shifts"] and r0["shifts"]  # the kept shifts: equal on both ranks, in the state
    mean = (_rank_data(0).double() + _rank_data(1).double()) / 2

    def nmse(step: int) -> float:
        want = mean * PLAN[step]
        return float(((r0["results"][step].double() - want) ** 2).sum() / (want**2).sum())
    if mode != "stale":
        assert nmse(2) < 2.0 * nmse(0) and nmse(3) < 2.0 * nmse(0), (nmse(0), nmse(2), nmse(3))
        assert nmse(0) < 0.3
