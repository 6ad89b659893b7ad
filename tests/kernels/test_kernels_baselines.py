"""Bit-exact parity of the baseline compressors' fast paths (tailq.kernels.baselines): plain-torch reference vs the
compiled CPU path vs the Triton kernels (interpreted on CPU, see conftest), for QSGD / NUQSGD at bits 2..8,
TernGrad and EF-sign, at odd lengths and bucket sizes that do not divide them; the implementations are called
directly (a fallback cannot hide a mismatch) and through the codec API (nothing falls back). Also: with a
``torch.Generator`` the references give what they gave before the fast paths existed, and TernGrad's new
counter-key rounding is unbiased.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from tailq.codec.base import Compressor, Encoded
from tailq.codec.efsign import EFSign
from tailq.codec.packing import pack_bits
from tailq.codec.qsgd import NUQSGD, QSGD
from tailq.codec.scales import round_up_f32
from tailq.codec.terngrad import TernGrad
from tailq.kernels import RandKey, baselines, dispatch, use

HAVE_TRITON = importlib.util.find_spec("triton") is not None
CPU_LENGTHS = (7, 513, 100_003)  # n = 1 in test_length_one (each new size class costs inductor a compile)
TRITON_LENGTHS = (7, 513, 1_031)  # the interpreter runs a kernel element by element in numpy: keep them short
BUCKETS = (100, 512)

IMPLS = [
    "compiled",
    pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")),
]


def _impl(name: str) -> Callable[[str], Callable[..., Any]]:
    if name == "compiled":
        return lambda op: baselines.compiled_impl[op]
    from tailq.kernels import triton_baselines

    return lambda op: getattr(triton_baselines, op)


def _lengths(impl: str) -> tuple[int, ...]:
    return CPU_LENGTHS if impl == "compiled" else TRITON_LENGTHS


def heavy(n: int, seed: int) -> torch.Tensor:
    """Student-t(3) values with the hard cases up front: zeros of both signs, a huge and a tiny value."""
    x = torch.from_numpy(np.random.default_rng(seed).standard_t(3.0, n).astype(np.float32))
    special = torch.tensor([0.0, -0.0, 1e30, -1e-30, 7.0, -7.0], dtype=torch.float32)
    k = min(n, special.numel())
    x[:k] = special[:k]
    return x


def _same(a: Encoded, b: Encoded) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


def _check_codec(comp: Compressor, x: torch.Tensor, key: RandKey, impl: str) -> None:
    """Through the codec API on ``impl``: the reference's bytes and decode, also into ``out``, no fallback."""
    with use("reference"):
        ref = comp.encode(x, generator=key)
        dec = comp.decode(ref)
    dispatch.reset()
    with use(impl):
        got = comp.encode(x, generator=key)
        assert _same(got, ref), f"{comp.format_id} n={x.numel()} ({impl}): encoded tensors differ"
        assert torch.equal(comp.decode(got), dec), f"{comp.format_id} n={x.numel()} ({impl}): decode differs"
        out = torch.full((x.numel(),), math.nan)
        res = comp.decode(ref, out=out)  # type: ignore[call-arg]
        assert torch.equal(out, dec.reshape(-1)) and res.data_ptr() == out.data_ptr()
        assert dispatch.path_for(x.device) == impl and not dispatch._broken, dispatch._broken


# ---------------------------------------------------------------------------------------------------------
# QSGD / NUQSGD


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cls", [QSGD, NUQSGD], ids=["qsgd", "nuqsgd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_qsgd_parity(impl: str, cls: type, bits: int) -> None:
    op = _impl(impl)
    for bucket in BUCKETS:
        comp = cls(bits=bits, bucket_size=bucket)
        levels = comp._fast_levels()
        for n in _lengths(impl):
            x = heavy(n, seed=n + bits) * 1e-3
            key = RandKey(3, 1, n, bits)
            with use("reference"):
                ref = comp.encode(x, generator=key)
                dec = comp.decode(ref)
            b = min(bucket, n)
            norms = comp.norms(x)
            assert torch.equal(norms, ref.tensors["norms"])
            got = op("qsgd_encode")(x, norms, key, bits, b, levels)
            assert got.dtype == torch.uint8 and torch.equal(got, ref.tensors["codes"]), (n, bucket)
            res = op("qsgd_decode")(ref.tensors["codes"], norms, bits, b, n, levels, None)
            assert torch.equal(res, dec.reshape(-1)), (n, bucket)
    _check_codec(cls(bits=bits, bucket_size=100), heavy(4099, seed=bits), RandKey(0, 2, 1, 0), impl)


# ---------------------------------------------------------------------------------------------------------
# TernGrad


TERN_CASES = {
    "tensor": {},
    "bucket100": {"bucket_size": 100, "clip_sigma": 2.0},
    "bucket512-noclip": {"bucket_size": 512, "clip_sigma": math.inf},
    "noclip": {"clip_sigma": math.inf},
}


@pytest.mark.parametrize("case", sorted(TERN_CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_terngrad_parity(impl: str, case: str) -> None:
    op = _impl(impl)
    comp = TernGrad(**TERN_CASES[case])
    for n in _lengths(impl):
        x = heavy(n, seed=n)
        key = RandKey(5, 0, n, 2)
        with use("reference"):
            ref = comp.encode(x, generator=key)
            dec = comp.decode(ref)
        b, _ = comp._layout(n)
        codes, scales = op("terngrad_encode")(x, comp.thresholds(x), key, b)
        assert torch.equal(scales, ref.tensors["scales"]), (n, case)
        assert codes.dtype == torch.uint8 and torch.equal(codes, ref.tensors["codes"]), (n, case)
        assert torch.equal(op("terngrad_decode")(ref.tensors["codes"], scales, b, n, None), dec.reshape(-1))
    _check_codec(comp, heavy(4099, seed=1), RandKey(0, 1, 1, 1), impl)


def test_terngrad_counter_key_is_unbiased() -> None:
    """With RandKeys (a different step each draw) the decode's mean is the clipped input within 4.5 standard
    errors per coordinate (null variance S|t| - t^2 of the ternary law), and the draws are the counter uniforms."""
    comp = TernGrad(bucket_size=16, clip_sigma=2.0)
    x = heavy(67, seed=3)
    x[-2:] = torch.tensor([40.0, -25.0])
    reps = 3000
    with use("reference"):
        s = torch.stack([comp.decode(comp.encode(x, generator=RandKey(9, 0, i, 0))).double() for i in range(reps)])
        t = comp.target(x).double()
        scale = comp.encode(x, generator=RandKey()).tensors["scales"].double().repeat_interleave(16)[:67]
    var = (scale * t.abs() - t * t).clamp_min(0.0)
    z = (s.mean(0) - t).abs() / (var / reps).sqrt()
    moving = var > 0
    assert bool((z[moving] <= 4.5).all()), f"max z = {float(z[moving].max()):.2f}"
    assert torch.equal(s.mean(0)[~moving], t[~moving])
    assert bool(((s == 0) | (s.abs() == scale)).all()), "a decode is 0 or +-S"
    assert TernGrad.counter_randomness


# ---------------------------------------------------------------------------------------------------------
# EF-sign


@pytest.mark.parametrize("impl", IMPLS)
def test_efsign_parity(impl: str) -> None:
    op = _impl(impl)
    comp = EFSign()
    for n in _lengths(impl):
        x = heavy(n, seed=n)
        with use("reference"):
            ref = comp.encode(x)
            dec = comp.decode(ref)
        assert torch.equal(ref.tensors["signs"], _old_efsign(x)[0])
        assert torch.equal(op("efsign_encode")(x), ref.tensors["signs"]), n
        assert torch.equal(op("efsign_decode")(ref.tensors["signs"], ref.tensors["scale"], n, None), dec.reshape(-1))
    _check_codec(comp, heavy(4099, seed=2), RandKey(), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_length_one(impl: str) -> None:
    """A single value (inductor specializes size 1: one representative of each compressor)."""
    x = torch.tensor([-0.75])
    for comp in (QSGD(bits=4), NUQSGD(bits=3), TernGrad(), TernGrad(clip_sigma=math.inf), EFSign()):
        with use("reference"):
            ref = comp.encode(x, generator=RandKey(1, 1, 1, 1))
            dec = comp.decode(ref)
        dispatch.reset()
        with use(impl):
            assert _same(comp.encode(x, generator=RandKey(1, 1, 1, 1)), ref), comp.format_id
            assert torch.equal(comp.decode(ref), dec), comp.format_id
            assert not dispatch._broken, dispatch._broken


# ---------------------------------------------------------------------------------------------------------
# the references did not change for a torch.Generator (the code before the fast paths, verbatim)


def _old_qsgd(comp: Any, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1)
    n = flat.numel()
    b, nb = comp._layout(n)
    pad = nb * b - n
    v = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    norm64 = torch.linalg.vector_norm(v.view(nb, b), dim=1, dtype=torch.float64)
    norms = round_up_f32(norm64, "norm")
    ne = norms.repeat_interleave(b)[:n]
    r = flat.abs() / torch.where(ne > 0, ne, torch.ones_like(ne))
    k = comp._round(r, gen)
    codes = torch.where(flat < 0, -k, k) + comp.s
    return pack_bits(codes, comp.bits, check=False), norms


def _old_terngrad(comp: Any, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1)
    n = flat.numel()
    b, nb = comp._layout(n)
    te = comp.thresholds(flat).repeat_interleave(b)[:n]
    g = torch.maximum(torch.minimum(flat, te), -te)
    scales = comp._groups(g.abs(), 0.0).amax(dim=1)
    se = scales.repeat_interleave(b)[:n]
    p = g.abs() / torch.where(se > 0, se, torch.ones_like(se))
    u = torch.rand(n, generator=gen, dtype=torch.float32, device=flat.device)
    keep = (u < p).to(torch.int64)
    codes = torch.where(g < 0, -keep, keep) + 1
    return pack_bits(codes, 2, check=False), scales


def _old_efsign(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1)
    scale = (flat.abs().sum(dtype=torch.float64) / flat.numel()).to(torch.float32).reshape(1)
    return pack_bits((flat >= 0).to(torch.uint8), 1, check=False), scale


@pytest.mark.parametrize("path", ["reference", "compiled"])
def test_generator_results_unchanged(path: str) -> None:
    x = heavy(1_003, seed=11)
    cases: list[tuple[Compressor, Callable[..., tuple[torch.Tensor, torch.Tensor]], tuple[str, str]]] = [
        (QSGD(bits=3, bucket_size=100), _old_qsgd, ("codes", "norms")),
        (NUQSGD(bits=6), _old_qsgd, ("codes", "norms")),
        (TernGrad(), _old_terngrad, ("codes", "scales")),
        (TernGrad(bucket_size=100, clip_sigma=1.5), _old_terngrad, ("codes", "scales")),
    ]
    with use(path):
        for comp, old, names in cases:
            enc = comp.encode(x, generator=torch.Generator().manual_seed(4))
            want = old(comp, x, torch.Generator().manual_seed(4))
            assert all(torch.equal(enc.tensors[k], w) for k, w in zip(names, want, strict=True)), comp.format_id
        enc = EFSign().encode(x)
        assert all(torch.equal(enc.tensors[k], w) for k, w in zip(("signs", "scale"), _old_efsign(x), strict=True))


def test_fast_paths_reject_what_they_cannot_do() -> None:
    """Ineligible inputs return None (the codec then runs its reference)."""
    x = heavy(64, seed=0)
    norms = QSGD(bucket_size=16).norms(x)
    with use("compiled"):
        assert baselines.qsgd_encode(x.double(), norms, RandKey(), 4, 16, None) is None
        assert baselines.qsgd_encode(x, norms[:2], RandKey(), 4, 16, None) is None  # wrong number of norms
        assert baselines.terngrad_decode(torch.zeros(3, dtype=torch.uint8), torch.ones(1), 64, 64) is None
        assert baselines.efsign_encode(x[::2]) is None  # not contiguous
        with pytest.raises(ValueError, match="out has"):
            EFSign().decode(EFSign().encode(x), out=torch.empty(3))
    with use("reference"):
        assert baselines.efsign_encode(x) is None
