"""Fast histogram statistics: the exponent/mantissa bin index equals the log2 one, the vector equals the reference."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import tailq
from tailq.codec.stats import histogram_stats
from tailq.kernels import cpu as kcpu
from tailq.kernels import use
from tailq.theory import HIST_K, HIST_LO, HIST_NBINS, hist_bin_index, hist_edges


def _fast_bins(a: np.ndarray) -> np.ndarray:
    """Bins of float32 magnitudes by the fast rule, evaluated with plain (eager) torch ops."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    b = t.view(torch.int32) & 0x7FFFFFFF
    thr = torch.tensor(kcpu.mantissa_thresholds(), dtype=torch.int32)
    return kcpu.bins_from_bits(b >> 23, b & 0x7FFFFF, thr).numpy()


def _edge_values() -> np.ndarray:
    """Every float32 at or next to a bin edge, subnormals, 0, the zero-bin and overflow boundaries, extremes."""
    edges = hist_edges()  # LO * 2^(i/4), i = 0..K, in float64
    f = edges.astype(np.float32)
    vals = [f, np.nextafter(f, np.float32(0)), np.nextafter(f, np.float32(np.inf))]
    # the float32 neighbours of the *exact* irrational edges: the first float32 at or above, and the one below
    above = np.where(f.astype(np.float64) < edges, np.nextafter(f, np.float32(np.inf)), f)
    vals += [above, np.nextafter(above, np.float32(0))]
    special = np.array(
        [0.0, -0.0, 1e-45, 2e-45, 1.17e-38, 1.1754942e-38, 2.0**-126, 2.0**-40, 2.0**-41, 2.0**16, 2.0**15,
         65535.996, 65536.004, 1.0, 2.0**0.25, 2.0**0.5, 2.0**0.75, 3.4028235e38, 1e30, 7e-20],
        dtype=np.float32,
    )  # fmt: skip
    sub = np.arange(1, 2000, dtype=np.uint32).view(np.float32)  # subnormals
    up = np.nextafter(special[special < 3e38], np.float32(np.inf))
    out = np.concatenate([*vals, special, sub, up])
    return np.concatenate([out, -out]).astype(np.float32)


def test_fast_bin_index_equals_log2_bin_on_edges() -> None:
    a = _edge_values()
    np.testing.assert_array_equal(_fast_bins(a), hist_bin_index(a.astype(np.float64)))


def test_fast_bin_index_equals_log2_bin_on_every_mantissa_near_thresholds() -> None:
    """All float32 within 4096 ulps of 2^(k/4) for k = 1..3 (the only non-power-of-two edges), at many octaves."""
    out = []
    for k in (1, 2, 3):
        c = np.float32(2.0 ** (k / 4))
        base = int(np.array(c).view(np.int32))
        bits = np.arange(base - 4096, base + 4096, dtype=np.int32)
        m = bits.view(np.float32)
        for e in (-40, -39, -20, -1, 0, 1, 10, 15):
            out.append(np.ldexp(m, e).astype(np.float32))
    a = np.concatenate(out)
    np.testing.assert_array_equal(_fast_bins(a), hist_bin_index(a.astype(np.float64)))


def test_fast_bin_index_on_random_magnitudes() -> None:
    rng = np.random.default_rng(0)
    a = np.exp2(rng.uniform(-60, 30, 200_000)).astype(np.float32)
    np.testing.assert_array_equal(_fast_bins(a), hist_bin_index(a.astype(np.float64)))
    assert _fast_bins(np.array([HIST_LO], dtype=np.float32))[0] == 1
    assert _fast_bins(np.array([2.0**16], dtype=np.float32))[0] == HIST_K + 1


@pytest.mark.parametrize("impl", ["compiled", "inductor"])  # with and without the C kernels (conftest)
@pytest.mark.parametrize("n", [1, 7, 1001, (1 << 20) + 4099, 2_500_001])
def test_fast_statistics_equal_the_reference_bit_for_bit(n: int, impl: str) -> None:
    rng = np.random.default_rng(n)
    x = torch.from_numpy((rng.standard_cauchy(n) * 1e-3).astype(np.float32))
    special = torch.tensor([0.0, -0.0, 1e-45, -3e-42, 2.0**-40, 7e5, -2.0**16, 1e-30], dtype=torch.float32)
    k = min(n, special.numel())
    x[:k] = special[:k]
    for shift in (0, -30, 17, kcpu.MIN_SHIFT):  # every bin occupied somewhere: zero, regular and overflow bins
        ref = histogram_stats(x, with_logs=False, shift=shift)
        got, bad = kcpu.histogram_stats(x, shift)
        assert bad == 0
        assert got.dtype == ref.dtype and torch.equal(got, ref), (impl, shift)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("n", [1, 7, 1001, 300_007])
def test_triton_statistics_equal_the_reference_bit_for_bit(n: int) -> None:
    from tailq.kernels import triton_impl  # interpreted on CPU tensors (TRITON_INTERPRET=1, see conftest)

    rng = np.random.default_rng(n + 1)
    x = torch.from_numpy((rng.standard_cauchy(n) * 1e-3).astype(np.float32))
    special = torch.tensor([0.0, -0.0, 1e-45, -3e-42, 2.0**-40, 7e5, -2.0**16, 1e-30], dtype=torch.float32)
    k = min(n, special.numel())
    x[:k] = special[:k]
    for shift in (0, -30, 17):
        res = triton_impl.histogram_stats(x, shift)
        assert res is not None and res[1] == 0
        assert torch.equal(res[0], histogram_stats(x, with_logs=False, shift=shift)), shift
    x[n // 2] = float("nan")
    res = triton_impl.histogram_stats(x, 0)
    assert res is not None and res[1] == 1


def test_c_histogram_sums_are_exact_where_float32_sums_are_not() -> None:
    """2^24 + 3 values of one bin: a float32 running sum stalls at 2^24 ulps, the integer significand sum and the
    reference's float64 sum do not; both say 2^24 + 3 exactly."""
    from tailq.kernels import native

    if not native.available():
        pytest.skip(f"no C kernels here: {native.why_unavailable()}")
    x = torch.ones((1 << 24) + 3)
    got, _ = kcpu.histogram_stats(x)
    ref = histogram_stats(x, with_logs=False)
    assert torch.equal(got, ref)
    one_bin = int(torch.nonzero(got[:HIST_NBINS]).flatten()[0])
    assert float(got[HIST_NBINS + one_bin]) == float(np.float32((1 << 24) + 3))


def test_the_c_kernels_fail_over_to_inductor_when_no_compiler_works(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: object, caplog: pytest.LogCaptureFixture
                                                                     ) -> None:  # fmt: skip
    import logging

    from tailq.kernels import native

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("TAILQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native.shutil, "which", lambda name: "/bin/false" if name == "/nonexistent/cc" else None)
    x = torch.from_numpy(np.random.default_rng(5).standard_t(3.0, 50_000).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="tailq.kernels"):
        got, bad = kcpu.histogram_stats(x)
    assert not native.available() and "failed" in (native.why_unavailable() or "")
    assert any("could not be built" in r.getMessage() for r in caplog.records)
    assert bad == 0 and torch.equal(got, histogram_stats(x, with_logs=False))


def test_nonfinite_detected_and_reported_as_before() -> None:
    x = torch.randn(5000)
    x[17], x[99] = float("nan"), float("inf")
    _, bad = kcpu.histogram_stats(x)
    assert bad == 2 and kcpu.nonfinite_count(x) == 2
    comp = tailq.compressor("tnq", bits=3)
    for path in ("reference", "compiled"):
        with use(path), pytest.raises(ValueError, match="1 NaN, 1 Inf"):
            comp.local_stats(x)
        with use(path), pytest.raises(ValueError, match="non-finite"):
            comp.encode_with(x, comp.codebook(comp.local_stats(torch.randn(100))))


def test_compressor_statistics_and_encoding_identical_on_both_paths() -> None:
    x = torch.from_numpy(np.random.default_rng(3).standard_t(3.5, 50_001).astype(np.float32))
    key = tailq.kernels.RandKey(1, 0, 4, 2)
    for name in ("tuq", "tnq", "tbq"):
        comp = tailq.compressor(name, bits=3)
        with use("reference"):
            st, enc = comp.local_stats(x), comp.encode(x, generator=key)
            dec = comp.decode(enc)
        with use("compiled"):
            st2, enc2 = comp.local_stats(x), comp.encode(x, generator=key)
            dec2 = comp.decode(enc2)
        assert torch.equal(st, st2), name
        assert enc.tensors.keys() == enc2.tensors.keys()
        for k in enc.tensors:
            assert torch.equal(enc.tensors[k], enc2.tensors[k]), (name, k)
        assert torch.equal(dec, dec2), name
