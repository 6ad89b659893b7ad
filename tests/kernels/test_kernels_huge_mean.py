"""The mean of N dense decodes near float32's largest value, on every implementation (issue 24, item 6).

``Codebook.decode_mean_packed`` sums the N decodes in float32 and divides by N (every kernel does, in the
reference's order). Levels within a factor 2N of float32's largest value would overflow that sum although the
mean is finite; the codebook then runs the same kernels on its levels scaled by 2^-k and scales the mean back
(:func:`tailq.codec.codebook.mean_headroom`). Checked on the reference, the C kernels, inductor and Triton
(interpreted on CPU):

* the mean is finite and within float32 rounding of the float64 mean of the decodes, N·2^-23·max|level|;
* it is the mean of the same codes on the levels scaled by 2^-k, times 2^k, bit for bit (the float32 sum rounds
  as it would with an unbounded exponent), so every implementation gives the same bits;
* codebooks away from the top (N·max|level| ≤ FLOAT32_MAX/2) take the plain path: k = 0.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

import tailq
from tailq.codec import FLOAT32_MAX, Codebook
from tailq.kernels import RandKey, dispatch, use

HAVE_TRITON = importlib.util.find_spec("triton") is not None
IMPLS = [
    "reference",
    "compiled",  # the C kernels where they apply
    "inductor",  # the compiled path with the C kernels switched off (conftest)
    pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")),
]
N = 4099


def _codebooks() -> dict[str, Codebook]:
    x = torch.from_numpy(np.random.default_rng(0).standard_t(3.5, 20000).astype(np.float32))
    comp = tailq.compressor("tnq", bits=4)
    tnq = comp.codebook(comp.local_stats(x))
    assert tnq is not None
    top = torch.tensor(FLOAT32_MAX, dtype=torch.float64)
    return {
        "uniform 3e38, 3 bits": Codebook.uniform_grid(3.0e38, 7),  # span beyond float32: rounds through levels
        "uniform 1.6e38, 4 bits": Codebook.uniform_grid(1.6e38, 15),  # affine (span within float32)
        "tnq at float32's max": Codebook((tnq.levels.double() * (top / tnq.high)).to(torch.float32)),
    }


CODEBOOKS = _codebooks()
# (codebook, N) whose plain float32 sum of N decodes overflows: the affine grid from N = 3 on
CASES = [(w, c) for w in CODEBOOKS for c in (2, 3, 8) if c * CODEBOOKS[w].high > FLOAT32_MAX]


@pytest.mark.parametrize("which, count", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mean_of_decodes_near_float32_max_is_finite_and_exact(impl: str, which: str, count: int) -> None:
    cb = CODEBOOKS[which]
    bits = max(1, (cb.s).bit_length())
    # inputs at the outer levels (every payload mostly at the top: the worst case for the sum) and spread values
    x = torch.linspace(cb.low, cb.high, N, dtype=torch.float64).to(torch.float32)
    x[: N // 2] = cb.high
    with use("reference"):
        payloads = [cb.encode_packed(x, RandKey(3, r, 0, 0), bits) for r in range(count)]
        decodes = [cb.decode_packed(p, bits, N).double() for p in payloads]
    exact = sum(decodes) / count  # float64: no overflow
    k = math.ceil(math.log2(2 * count * max(-cb.low, cb.high) / FLOAT32_MAX))  # the fewest octaves of headroom
    assert k > 0  # these codebooks need some
    scaled = Codebook(cb.levels * 2.0**-k, uniform=cb.uniform)
    path = "compiled" if impl == "inductor" else impl
    with use(path):
        got = cb.decode_mean_packed(payloads, bits, N)
        out = torch.empty(N)
        into = cb.decode_mean_packed(payloads, bits, N, out)
        low = scaled.decode_mean_packed(payloads, bits, N)  # the same codes, levels 2^k lower: the plain path
        assert dispatch.path_for(x.device) == path  # no fallback hid a failure
    assert bool(torch.isfinite(got).all())
    tol = count * 2.0**-23 * max(-cb.low, cb.high)
    assert float((got.double() - exact).abs().max()) <= tol
    assert torch.equal(got, low * 2.0**k)  # bit for bit: the float32 sum with an unbounded exponent
    assert into.data_ptr() == out.data_ptr() and torch.equal(into, got)
    with use("reference"):  # every implementation gives the reference's bits
        assert torch.equal(got, cb.decode_mean_packed(payloads, bits, N))


def test_codebooks_away_from_the_top_take_the_plain_path() -> None:
    from tailq.codec.codebook import mean_headroom

    for which, cb in CODEBOOKS.items():  # the octaves the test above expects
        for count in (2, 3, 8):
            want = math.ceil(math.log2(2 * count * max(-cb.low, cb.high) / FLOAT32_MAX))
            assert mean_headroom(max(-cb.low, cb.high), count) == want, which
    for count in (1, 2, 3, 8, 1024):
        assert mean_headroom(FLOAT32_MAX / (2 * count), count) == 0
        assert mean_headroom(FLOAT32_MAX / (2 * count) * 1.0001, count) == 1
        k = mean_headroom(FLOAT32_MAX, count)
        assert count * FLOAT32_MAX * 2.0**-k <= FLOAT32_MAX / 2 < count * FLOAT32_MAX * 2.0 ** (1 - k)
