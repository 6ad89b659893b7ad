"""Bit-exact parity: plain-torch reference vs the compiled CPU path vs the Triton kernels (interpreter on CPU).

For every scheme (uniform grid as TUQ and single-scale use it, TNQ and TBQ levels, fine-grid snapped levels for
the summable route), every bit width 1..8 and odd lengths: the same (input, codebook, key) gives identical
integer codes, identical packed bytes and lane words, and identical float32 decodes. The implementations are
called directly (not through the dispatcher) so a fallback can never hide a mismatch.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import tailq
from tailq.codec import Codebook
from tailq.codec.packing import pack_bits, pack_lanes, plan_lanes, unpack_bits, unpack_lanes
from tailq.kernels import RandKey, use
from tailq.kernels import cpu as kcpu

HAVE_TRITON = importlib.util.find_spec("triton") is not None
LENGTHS = (1, 7, 1001, 4099)
BITS = tuple(range(1, 9))
SCHEMES = ("uniform", "tnq", "tbq")


IMPLS = [
    "compiled",  # the CPU fast path as it runs: the C kernels (tailq.kernels.native) where they apply, inductor else
    "inductor",  # the same path with the C kernels switched off (what runs where no C compiler works)
    pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")),
]


def _impl(name: str) -> object:
    if name in ("compiled", "inductor"):  # "inductor": the conftest switches the C kernels off for the test
        return kcpu
    from tailq.kernels import triton_impl  # interpreted on CPU tensors (TRITON_INTERPRET=1, see conftest)

    return triton_impl


def heavy(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_t(3.5, n).astype(np.float32))


def _codebook(scheme: str, bits: int) -> Codebook:
    """A real design: TUQ/TNQ/TBQ from the empirical histogram of heavy-tailed data."""
    comp = tailq.compressor("tuq" if scheme == "uniform" else scheme, bits=bits)
    cb = comp.codebook(comp.local_stats(heavy(20000, seed=bits)))
    assert cb is not None
    return cb


def _inputs(n: int, cb: Codebook) -> torch.Tensor:
    """Heavy-tailed values plus the hard cases: exact levels, midpoints, the clip boundaries and beyond."""
    x = heavy(n, seed=n) * (cb.high / 3)
    special = torch.cat([cb.levels, (cb.levels[1:] + cb.levels[:-1]) / 2, torch.tensor([cb.low * 2, cb.high * 2, 0.0])])
    k = min(n, special.numel())
    x[:k] = special[:k]
    return x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dense_encode_decode_parity(impl: str, scheme: str, bits: int) -> None:
    cb = _codebook(scheme, bits)
    spec = cb.round_spec
    for n in LENGTHS:
        x = _inputs(n, cb)
        key = RandKey(7, 1, n, bits)
        with use("reference"):  # the reference: plain torch, int64 codes
            codes = cb.encode(x, key)
            others = [pack_bits(cb.encode(x, RandKey(7, r, n, bits)), bits) for r in (2, 3)]
        ref = pack_bits(codes, bits)
        ref_dec = cb.decode(codes).to(torch.float32)
        ref_mean = torch.zeros(n)
        for p in (ref, *others):
            ref_mean += cb.decode(unpack_bits(p, bits, n).to(torch.int64))
        ref_mean = ref_mean / 3
        k = _impl(impl)
        got = k.encode_dense(x, spec, key, bits)  # type: ignore[attr-defined]
        assert got.dtype == torch.uint8 and got.numel() == ref.numel(), n
        assert torch.equal(got, ref), f"packed bytes differ (n={n}, bits={bits}, {scheme})"
        assert torch.equal(unpack_bits(got, bits, n).to(torch.int64), codes)  # the same integer codes
        dec = k.decode_dense(ref, spec, bits, n)  # type: ignore[attr-defined]
        assert torch.equal(dec, ref_dec), f"decode differs (n={n}, bits={bits}, {scheme})"
        mean = k.decode_dense_mean([ref, *others], spec, bits, n)  # type: ignore[attr-defined]
        assert torch.equal(mean, ref_mean), f"mean decode differs (n={n}, bits={bits}, {scheme})"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("impl", IMPLS)
def test_lanes_encode_decode_parity(impl: str, scheme: str, bits: int) -> None:
    cb = _codebook(scheme, bits)
    k = _impl(impl)
    grid = cb.s if scheme == "uniform" else min(2 ** (bits + 2) - 1, 2**16 - 1)
    snapped = cb.snap(grid)
    spec = snapped.round_spec
    for n_workers, word_bits in ((4, None), (3, 64)):
        plan = plan_lanes(n_workers, grid, word_bits)
        for n in LENGTHS:
            x = _inputs(n, snapped.codebook)
            xs = [x * (1 + 0.1 * r) for r in range(n_workers)]
            with use("reference"):
                fine = [snapped.encode_fine(xs[r], RandKey(1, r, 2, 3)) for r in range(n_workers)]
            words = [pack_lanes(f, plan) for f in fine]
            total = torch.stack(words).sum(0).to(plan.dtype)
            ref_mean = snapped.decode_sum(unpack_lanes(total, plan, n), n_workers)
            for r in range(n_workers):
                got = k.encode_lanes(xs[r], spec, RandKey(1, r, 2, 3), plan)  # type: ignore[attr-defined]
                assert got.dtype == plan.dtype and torch.equal(got, words[r]), (
                    f"lane words differ (n={n}, bits={bits}, {scheme}, N={n_workers})"
                )
            lo, hi = snapped.codebook.low, snapped.codebook.high
            mean = k.decode_lanes(total, plan, n, lo, (hi - lo) / (grid * n_workers))  # type: ignore[attr-defined]
            assert torch.equal(mean, ref_mean), f"lane decode differs (n={n}, bits={bits}, {scheme})"


@pytest.mark.parametrize("impl", IMPLS)
def test_round_codes_parity(impl: str) -> None:
    """The rounding alone (used by multi-scale, qsgd, nuqsgd with a key): codes equal the reference."""
    from tailq.codec.codebook import stochastic_round_levels, stochastic_round_uniform

    x = heavy(4099, seed=2)
    lv = torch.tensor([-1.0, -0.3, 0.0, 0.2, 0.25, 1.5], dtype=torch.float32)
    key = RandKey(2, 2, 2, 2)
    with use("reference"):
        ru = stochastic_round_uniform(x.abs() * 3, 0.0, 1.0, 7, key)
        rl = stochastic_round_levels(x, lv, key)
    with use("compiled" if impl == "inductor" else impl):
        assert torch.equal(stochastic_round_uniform(x.abs() * 3, 0.0, 1.0, 7, key), ru)
        assert torch.equal(stochastic_round_levels(x, lv, key), rl)
    assert ru.dtype == rl.dtype == torch.int64


@pytest.mark.parametrize("impl", IMPLS)
def test_codec_entry_points_give_the_reference_bytes(impl: str) -> None:
    """Through the codec API (dispatch included): the packed entry points give the same bytes on every path."""
    from tailq.kernels import dispatch, use

    cb = _codebook("tnq", 3)
    x = heavy(4099, seed=5)
    key = RandKey(0, 0, 9, 1)
    with use("reference"):
        ref = cb.encode_packed(x, key, 3)
        dec = cb.decode_packed(ref, 3, x.numel())
    path = "compiled" if impl == "inductor" else impl
    with use(path):
        assert dispatch.path_for(x.device) == path
        assert torch.equal(cb.encode_packed(x, key, 3), ref)
        assert torch.equal(cb.decode_packed(ref, 3, x.numel()), dec)
        assert dispatch.path_for(x.device) == path  # nothing fell back
        assert torch.equal(pack_bits(cb.encode(x, key), 3), ref)  # the unpacked entry point too
