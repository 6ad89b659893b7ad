"""Triton kernels for the baseline compressors (QSGD / NUQSGD, TernGrad, EF-sign): codes + dense packing in one
kernel, unpacking + decode in another. Imported lazily by :mod:`tailq.kernels.baselines` (Triton may be missing).

The arithmetic is the reference's (see :mod:`tailq.kernels.baselines`): the counter uniform and the rounding of
:mod:`tailq.kernels.triton_impl`, IEEE float32 division (``div_rn``, not Triton's approximate default) and no FMA
contraction (``enable_fp_fusion=False``). The per-bucket reductions stay torch ops on the device: QSGD's norms
and TernGrad's thresholds in the codec (as the reference computes them), TernGrad's per-group ``max |g|`` here
(max is exact in any order). CI has no GPU: the parity tests run these on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .rng import RandKey
from .spec import RoundSpec
from .triton_impl import _code_at, _or, _padded_words, _round, _tables, _uniform

__all__ = ["efsign_decode", "efsign_encode", "qsgd_decode", "qsgd_encode", "terngrad_decode", "terngrad_encode"]

GROUPS = 32  # rows of 32 codes per program
_OPTS: dict[str, Any] = {"enable_fp_fusion": False}
_QSGD, _NUQ, _TERN, _SIGN = 0, 1, 2, 3


@triton.jit
def _codes(x, offs, b, kw_ptr, a_ptr, c_ptr, sf, si, lv_ptr, wd_ptr, sr_ptr, lmin, lmax, mask,
           KIND: tl.constexpr, S: tl.constexpr, STEPS: tl.constexpr):  # fmt: skip
    """Codes (int32) of one tile; ``a_ptr``: per-bucket norms (QSGD) or thresholds (TernGrad), ``c_ptr``: the
    TernGrad scales."""
    if KIND == 3:  # EF-sign
        code = (x >= 0).to(tl.int32)
    elif KIND == 2:  # TernGrad
        gi = offs // b
        te = tl.load(a_ptr + gi, mask=mask, other=1.0)
        se = tl.load(c_ptr + gi, mask=mask, other=1.0)
        g = tl.maximum(tl.minimum(x, te), -te)
        p = tl.math.div_rn(tl.abs(g), tl.where(se > 0, se, 1.0))
        keep = (_uniform(offs.to(tl.uint32), kw_ptr) < p).to(tl.int32)
        code = tl.where(g < 0, -keep, keep) + 1
    else:  # QSGD (uniform levels: affine rounding of r·s) or NUQSGD (level search on r)
        ne = tl.load(a_ptr + offs // b, mask=mask, other=1.0)
        r = tl.math.div_rn(tl.abs(x), tl.where(ne > 0, ne, 1.0))
        if KIND == 0:
            k = _round(r * sf, offs.to(tl.uint32), kw_ptr, 0.0, 1.0, lv_ptr, wd_ptr, sr_ptr, lmin, lmax, S, True,
                       STEPS)  # fmt: skip
        else:
            k = _round(r, offs.to(tl.uint32), kw_ptr, 0.0, 1.0, lv_ptr, wd_ptr, sr_ptr, lmin, lmax, S, False, STEPS)
        code = tl.where(x < 0, -k, k) + si
    return code


@triton.jit
def _encode_kernel(
    x_ptr, out_ptr, n, b, kw_ptr, a_ptr, c_ptr, sf, si, lv_ptr, wd_ptr, sr_ptr, lmin, lmax,
    BITS: tl.constexpr, KIND: tl.constexpr, S: tl.constexpr, STEPS: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * G + tl.arange(0, G)
    cols = tl.arange(0, 32)
    offs = rows[:, None] * 32 + cols[None, :]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    code = _codes(x, offs, b, kw_ptr, a_ptr, c_ptr, sf, si, lv_ptr, wd_ptr, sr_ptr, lmin, lmax, mask, KIND, S, STEPS)
    code = tl.where(mask, code, 0).to(tl.uint32)
    zero = tl.zeros([G, 32], tl.uint32)
    bitpos = cols * BITS
    for w in tl.static_range(BITS):  # the dense packing of triton_impl._encode_dense_kernel
        sh = bitpos - 32 * w
        lsh = tl.minimum(tl.maximum(sh, 0), 31).to(tl.uint32)
        rsh = tl.minimum(tl.maximum(-sh, 0), 31).to(tl.uint32)
        left = tl.where(((sh >= 0) & (sh < 32))[None, :], code << lsh[None, :], zero)
        right = tl.where(((sh < 0) & (sh > -BITS))[None, :], code >> rsh[None, :], zero)
        word = tl.reduce(left | right, 1, _or)
        tl.store(out_ptr + rows * BITS + w, word.to(tl.int32, bitcast=True), mask=rows * 32 < n)


@triton.jit
def _decode_kernel(words_ptr, out_ptr, n, b, sc_ptr, sf, si, lv_ptr, BITS: tl.constexpr, KIND: tl.constexpr,
                   G: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * G + tl.arange(0, G)
    cols = tl.arange(0, 32)
    offs = rows[:, None] * 32 + cols[None, :]
    mask = offs < n
    rows_c = tl.minimum(rows, (n + 31) // 32 - 1)
    code = _code_at(words_ptr, rows_c, cols, BITS)
    sc = tl.load(sc_ptr + offs // b, mask=mask, other=0.0)
    if KIND == 3:
        val = (2.0 * code.to(tl.float32) - 1.0) * sc
    elif KIND == 2:
        val = (code.to(tl.float32) - 1.0) * sc
    else:
        c = code - si
        a = tl.abs(c)
        if KIND == 0:
            mag = tl.math.div_rn(a.to(tl.float32), sf)
        else:
            mag = tl.load(lv_ptr + a, mask=mask, other=0.0)
        val = tl.where(c < 0, -mag, mag) * sc
    tl.store(out_ptr + offs, val, mask=mask)


# ---------------------------------------------------------------------------------------------------------
# launchers


def _kw(key: RandKey, device: torch.device) -> torch.Tensor:
    return torch.tensor(key.signed_words, dtype=torch.int32, device=device)


def _launch_encode(x: torch.Tensor, bits: int, kind: int, b: int, key: RandKey | None, a: torch.Tensor,
                   c: torch.Tensor, s: int = 0, levels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    n, dev = x.numel(), x.device
    if kind == _NUQ:
        assert levels is not None
        t = _tables(RoundSpec.for_rounding(levels, False), dev)
    else:  # the tables are unused (affine rounding or none): dummies of the right types
        spec = RoundSpec.for_rounding(torch.arange(max(s, 1) + 1, dtype=torch.float32), True, 0.0, 1.0)
        t = _tables(spec, dev)
    kw = _kw(key if key is not None else RandKey(), dev)
    rows = -(-n // 32)
    words = torch.empty(rows * bits, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(rows, GROUPS),)
    _encode_kernel[grid](
        x.reshape(-1), words, n, b, kw, a, c, float(s), s, t["lv"], t["wd"], t["sr"], t["lmin"], t["lmax"],
        BITS=bits, KIND=kind, S=t["S"], STEPS=t["STEPS"], G=GROUPS, **_OPTS,
    )  # fmt: skip
    return words.view(torch.uint8)[: (n * bits + 7) // 8]


def _launch_decode(packed: torch.Tensor, bits: int, kind: int, n: int, b: int, sc: torch.Tensor, s: int,
                   levels: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    dev = packed.device
    words, _ = _padded_words([packed], bits, n)
    out = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    lv = levels.to(device=dev, dtype=torch.float32) if levels is not None else sc
    rows = -(-n // 32)
    grid = (triton.cdiv(rows, GROUPS),)
    _decode_kernel[grid](
        words, out, n, b, sc, float(s), s, lv, BITS=bits, KIND=kind, G=GROUPS, **_OPTS,
    )  # fmt: skip
    return out


def qsgd_encode(
    x: torch.Tensor, norms: torch.Tensor, key: RandKey, bits: int, bucket: int, levels: torch.Tensor | None
) -> torch.Tensor:
    s = 2 ** (bits - 1) - 1
    kind = _QSGD if levels is None else _NUQ
    return _launch_encode(x, bits, kind, bucket, key, norms, norms, s, levels)


def qsgd_decode(
    packed: torch.Tensor, norms: torch.Tensor, bits: int, bucket: int, n: int, levels: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    s = 2 ** (bits - 1) - 1
    return _launch_decode(packed, bits, _QSGD if levels is None else _NUQ, n, bucket, norms, s, levels, out)


def terngrad_encode(
    x: torch.Tensor, thresholds: torch.Tensor, key: RandKey, bucket: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    nb = thresholds.numel()
    te = thresholds.repeat_interleave(bucket)[:n]
    g = torch.maximum(torch.minimum(x.reshape(-1), te), -te).abs()
    scales = torch.nn.functional.pad(g, (0, nb * bucket - n)).view(nb, bucket).amax(dim=1)  # exact in any order
    return _launch_encode(x, 2, _TERN, bucket, key, thresholds, scales), scales


def terngrad_decode(
    packed: torch.Tensor, scales: torch.Tensor, bucket: int, n: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    return _launch_decode(packed, 2, _TERN, n, bucket, scales, 0, None, out)


def efsign_encode(x: torch.Tensor) -> torch.Tensor:
    dummy = torch.zeros(1, dtype=torch.float32, device=x.device)
    return _launch_encode(x, 1, _SIGN, x.numel(), None, dummy, dummy)


def efsign_decode(packed: torch.Tensor, scale: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    return _launch_decode(packed, 1, _SIGN, n, n, scale, 0, None, out)
