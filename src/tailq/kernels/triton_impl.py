"""GPU kernels in Triton for the codec hot loops: round + dense pack, round + headroom lanes, unpack + decode.

Same definitions as the reference (:mod:`tailq.kernels.spec`, :mod:`tailq.kernels.rng`): the counter hash in
uint32, the float32 rounding constants of the :class:`~tailq.kernels.spec.RoundSpec`, decoding by the reference's
table (or its verified affine form). Every launch passes ``enable_fp_fusion=False`` so no multiply-add is
contracted into an FMA (that would change decoded floats in the last bit). CI has no GPU: the parity tests run
these kernels on CPU tensors under ``TRITON_INTERPRET=1``.

Layouts: dense packing works on rows of 32 codes = ``bits`` little-endian 32-bit words (the byte stream of
``pack_bits``); lanes follow ``pack_lanes`` (code i in word i % nwords, lane i // nwords). Statistics and the
finite check: the histogram (counts and exact integer significand sums by int64 atomics) is here; the finite check
returns ``None`` (one torch reduction on the GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from .rng import MIX_C1, MIX_C2, RandKey
from .spec import RoundSpec

__all__ = ["decode_dense", "decode_dense_mean", "decode_lanes", "encode_dense", "encode_lanes", "histogram_stats",
           "round_codes"]

GROUPS = 32  # rows of 32 codes per program (1024 elements)
LANE_BLOCK = 1024
CHAIN_MAX_S = 15  # chain of compares up to 15 intervals, binary search beyond
_OPTS: dict[str, Any] = {"enable_fp_fusion": False}


@triton.jit
def _mix(v):
    v = v ^ (v >> 16)
    v = v * tl.full(v.shape, MIX_C1, tl.uint32)
    v = v ^ (v >> 15)
    v = v * tl.full(v.shape, MIX_C2, tl.uint32)
    return v ^ (v >> 16)


@triton.jit
def _uniform(idx, kw_ptr):
    """Counter uniform float32 of uint32 element indices."""
    k0 = tl.load(kw_ptr).to(tl.uint32)
    k1 = tl.load(kw_ptr + 1).to(tl.uint32)
    h = _mix(_mix(idx ^ k0) ^ k1)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _round(x, idx, kw_ptr, low, inv, lv_ptr, wd_ptr, sr_ptr, lmin, lmax, S: tl.constexpr, AFFINE: tl.constexpr,
           STEPS: tl.constexpr):  # fmt: skip
    """Codes (int32) of float32 x at element indices idx (RoundSpec arithmetic; S = padded search size)."""
    u = _uniform(idx, kw_ptr)
    if AFFINE:
        t = (x - low) * inv
        t = tl.minimum(tl.maximum(t, 0.0), S * 1.0)
        j = tl.minimum(tl.floor(t), S - 1.0)
        code = j.to(tl.int32) + (u < (t - j)).to(tl.int32)
    else:
        xt = tl.maximum(tl.minimum(x, lmax), lmin)
        j = tl.zeros(x.shape, tl.int32)
        if S <= CHAIN_MAX_S:
            for k in tl.static_range(1, S):
                j += (xt >= tl.load(sr_ptr + k)).to(tl.int32)
        else:  # branchless binary search over the padded levels (S + 1 = 2^STEPS)
            for k in tl.static_range(STEPS):
                cand = j + ((S + 1) >> (k + 1))
                j = tl.where(xt >= tl.load(sr_ptr + cand), cand, j)
        lo = tl.load(lv_ptr + j)
        w = tl.load(wd_ptr + j)
        code = j + ((u * w) < (xt - lo)).to(tl.int32)
    return code


@triton.jit
def _encode_dense_kernel(
    x_ptr, out_ptr, n, kw_ptr, low, inv, lv_ptr, wd_ptr, sr_ptr, lmin, lmax,
    BITS: tl.constexpr, S: tl.constexpr, AFFINE: tl.constexpr, STEPS: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * G + tl.arange(0, G)
    cols = tl.arange(0, 32)
    offs = rows[:, None] * 32 + cols[None, :]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    code = _round(x, offs.to(tl.uint32), kw_ptr, low, inv, lv_ptr, wd_ptr, sr_ptr, lmin, lmax, S, AFFINE, STEPS)
    code = tl.where(mask, code, 0).to(tl.uint32)
    zero = tl.zeros([G, 32], tl.uint32)
    bitpos = cols * BITS
    for w in tl.static_range(BITS):
        sh = bitpos - 32 * w  # where code j's bits start relative to word w
        lsh = tl.minimum(tl.maximum(sh, 0), 31).to(tl.uint32)
        rsh = tl.minimum(tl.maximum(-sh, 0), 31).to(tl.uint32)
        left = tl.where(((sh >= 0) & (sh < 32))[None, :], code << lsh[None, :], zero)
        right = tl.where(((sh < 0) & (sh > -BITS))[None, :], code >> rsh[None, :], zero)
        word = tl.reduce(left | right, 1, _or)
        tl.store(out_ptr + rows * BITS + w, word.to(tl.int32, bitcast=True), mask=rows * 32 < n)


@triton.jit
def _encode_lanes_kernel(
    x_ptr, out_ptr, n, nw, kw_ptr, low, inv, lv_ptr, wd_ptr, sr_ptr, lmin, lmax, fine_ptr, lane_bits,
    S: tl.constexpr, AFFINE: tl.constexpr, STEPS: tl.constexpr, FINE: tl.constexpr, LANES: tl.constexpr,
    BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    wi = pid * BLOCK + tl.arange(0, BLOCK)
    wmask = wi < nw
    acc = tl.zeros([BLOCK], tl.int64)
    for j in tl.static_range(LANES):
        i = j * nw + wi
        m = wmask & (i < n)
        x = tl.load(x_ptr + i, mask=m, other=0.0)
        code = _round(x, i.to(tl.uint32), kw_ptr, low, inv, lv_ptr, wd_ptr, sr_ptr, lmin, lmax, S, AFFINE, STEPS)
        if FINE:
            code = tl.load(fine_ptr + code)
        sh = (lane_bits * j).to(tl.int64)
        acc += tl.where(m, code.to(tl.int64) << sh, tl.zeros([BLOCK], tl.int64))
    if WIDE:
        tl.store(out_ptr + wi, acc, mask=wmask)
    else:
        tl.store(out_ptr + wi, acc.to(tl.int32), mask=wmask)


@triton.jit
def _code_at(words_ptr, rows, cols, BITS: tl.constexpr):
    """Code (int32) at (row, col) of rows of 32 dense codes stored as BITS little-endian 32-bit words."""
    bitpos = cols * BITS
    wi = bitpos // 32
    sh = bitpos % 32
    need_hi = (sh + BITS > 32) & (wi + 1 < BITS)
    base = rows[:, None] * BITS
    lo = tl.load(words_ptr + base + wi[None, :]).to(tl.uint32, bitcast=True)
    hi = tl.load(words_ptr + base + tl.minimum(wi + 1, BITS - 1)[None, :]).to(tl.uint32, bitcast=True)
    v = lo >> sh.to(tl.uint32)[None, :]
    hs = tl.where(need_hi, 32 - sh, 1).to(tl.uint32)
    v = v | tl.where(need_hi[None, :], hi << hs[None, :], tl.zeros_like(hi))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _value(code, vals_ptr, step, low, DEC_AFFINE: tl.constexpr):
    if DEC_AFFINE:
        return code.to(tl.float32) * step + low
    return tl.load(vals_ptr + code)


@triton.jit
def _decode_dense_kernel(
    words_ptr, out_ptr, n, count, stride, vals_ptr, step, low,
    BITS: tl.constexpr, DEC_AFFINE: tl.constexpr, MEAN: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * G + tl.arange(0, G)
    cols = tl.arange(0, 32)
    offs = rows[:, None] * 32 + cols[None, :]
    mask = offs < n
    rows_c = tl.minimum(rows, (n + 31) // 32 - 1)
    if MEAN:
        acc = tl.zeros([G, 32], tl.float32)
        for r in range(count):  # payloads in order, summed from 0.0, then divided (the reference's order)
            code = _code_at(words_ptr + r * stride, rows_c, cols, BITS)
            acc = acc + _value(code, vals_ptr, step, low, DEC_AFFINE)
        acc = acc / count  # (not count.to(...): Triton specializes an int argument equal to 1 as a constexpr)
    else:
        acc = _value(_code_at(words_ptr, rows_c, cols, BITS), vals_ptr, step, low, DEC_AFFINE)
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _decode_lanes_kernel(words_ptr, out_ptr, n, nw, lane_bits, mask_v, scale_ptr, low_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    j = i // nw
    w = i - j * nw
    word = tl.load(words_ptr + w, mask=m, other=0).to(tl.int64)
    tot = (word >> (j * lane_bits).to(tl.int64)) & mask_v
    val = tot.to(tl.float64) * tl.load(scale_ptr) + tl.load(low_ptr)
    tl.store(out_ptr + i, val.to(tl.float32), mask=m)


# ---------------------------------------------------------------------------------------------------------
# launchers


def _search_size(spec: RoundSpec) -> int:
    return spec.s if spec.affine else (1 << spec.s.bit_length()) - 1


def _tables(spec: RoundSpec, device: torch.device) -> dict[str, Any]:
    size = _search_size(spec)
    search = torch.full((size + 1,), float("inf"), dtype=torch.float32)
    if not spec.affine:
        search[1 : spec.s] = spec.levels[1 : spec.s]
    fine = spec.fine if spec.fine is not None else torch.zeros(1, dtype=torch.int64)
    return {
        "lv": spec.levels.to(device),
        "wd": spec.widths.to(device),
        "sr": search.to(device),
        "lmin": float(spec.levels[0]),
        "lmax": float(spec.levels[spec.s]),
        "fine": fine.to(device=device, dtype=torch.int32),
        "S": size,
        "STEPS": (size + 1).bit_length() - 1,
    }


def _kw(key: RandKey, device: torch.device) -> torch.Tensor:
    return torch.tensor(key.signed_words, dtype=torch.int32, device=device)


def encode_dense(x: torch.Tensor, spec: RoundSpec, key: RandKey, bits: int) -> torch.Tensor:
    n = x.numel()
    dev = x.device
    t = _tables(spec, dev)
    rows = -(-n // 32)
    words = torch.empty(rows * bits, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(rows, GROUPS),)
    _encode_dense_kernel[grid](
        x.reshape(-1), words, n, _kw(key, dev), spec.low, spec.inv, t["lv"], t["wd"], t["sr"], t["lmin"], t["lmax"],
        BITS=bits, S=t["S"], AFFINE=spec.affine, STEPS=t["STEPS"], G=GROUPS, **_OPTS,
    )  # fmt: skip
    return words.view(torch.uint8)[: (n * bits + 7) // 8]


def round_codes(x: torch.Tensor, spec: RoundSpec, key: RandKey) -> torch.Tensor:
    """One uint8 code per element: the dense 8-bit packing is exactly that."""
    return encode_dense(x, spec, key, 8)


def encode_lanes(x: torch.Tensor, spec: RoundSpec, key: RandKey, plan: Any) -> torch.Tensor:
    n = x.numel()
    dev = x.device
    t = _tables(spec, dev)
    nw = plan.words_for(n)
    words = torch.empty(nw, dtype=plan.dtype, device=dev)
    grid = (triton.cdiv(nw, LANE_BLOCK),)
    _encode_lanes_kernel[grid](
        x.reshape(-1), words, n, nw, _kw(key, dev), spec.low, spec.inv, t["lv"], t["wd"], t["sr"], t["lmin"],
        t["lmax"], t["fine"], plan.lane_bits, S=t["S"], AFFINE=spec.affine, STEPS=t["STEPS"],
        FINE=spec.fine is not None, LANES=plan.lanes_per_word, BLOCK=LANE_BLOCK, WIDE=plan.word_bits == 64, **_OPTS,
    )  # fmt: skip
    return words


def _padded_words(payloads: Sequence[torch.Tensor], bits: int, n: int) -> tuple[torch.Tensor, int]:
    """Payloads copied into rows of 32 codes (``bits`` int32 words each), zero padded: (count, stride) int32."""
    rows = -(-n // 32)
    stride = rows * bits
    buf = torch.zeros(len(payloads), stride * 4, dtype=torch.uint8, device=payloads[0].device)
    for r, p in enumerate(payloads):
        buf[r, : p.numel()] = p.reshape(-1)
    return buf.view(torch.int32), stride


def _decode(
    payloads: Sequence[torch.Tensor], spec: RoundSpec, bits: int, n: int, mean: bool, out: torch.Tensor | None
) -> torch.Tensor:
    dev = payloads[0].device
    words, stride = _padded_words(payloads, bits, n)
    out = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    rows = -(-n // 32)
    grid = (triton.cdiv(rows, GROUPS),)
    _decode_dense_kernel[grid](
        words, out, n, len(payloads), stride, spec.values.to(dev), spec.dec_step, spec.dec_low,
        BITS=bits, DEC_AFFINE=spec.dec_affine, MEAN=mean, G=GROUPS, **_OPTS,
    )  # fmt: skip
    return out


def decode_dense(
    packed: torch.Tensor, spec: RoundSpec, bits: int, n: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    return _decode([packed], spec, bits, n, False, out)


def decode_dense_mean(
    payloads: Sequence[torch.Tensor], spec: RoundSpec, bits: int, n: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    return _decode(payloads, spec, bits, n, True, out)


def decode_lanes(
    words: torch.Tensor, plan: Any, n: int, low: float, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    dev = words.device
    out = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    nw = plan.words_for(n)
    grid = (triton.cdiv(n, LANE_BLOCK),)
    sc = torch.tensor([scale], dtype=torch.float64, device=dev)  # float64 scalars travel as tensors
    lo = torch.tensor([low], dtype=torch.float64, device=dev)  # (Triton passes Python floats as float32)
    _decode_lanes_kernel[grid](
        words.reshape(-1), out, n, nw, plan.lane_bits, (1 << plan.lane_bits) - 1, sc, lo, BLOCK=LANE_BLOCK, **_OPTS,
    )  # fmt: skip
    return out


HIST_BLOCK = 1024


@triton.jit
def _hist_kernel(x_ptr, n, shift, t1, t2, t3, counts_ptr, sums_ptr, bad_ptr, BLOCK: tl.constexpr):
    """Per value: its bin from the float's bits (as :func:`tailq.kernels.cpu.bins_from_bits` at ``shift``), one
    count and its 24-bit significand added to the bin by int64 atomics (integer adds: exact in any order)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(x_ptr + offs, mask=mask, other=0) & 0x7FFFFFFF
    e = b >> 23
    m = b & 0x7FFFFF
    es = e - shift
    sub = (m >= t1).to(tl.int32) + (m >= t2).to(tl.int32) + (m >= t3).to(tl.int32)
    idx = tl.minimum(4 * es - 347 + sub, 225)
    idx = tl.where(es < 87, 0, idx)
    sig = tl.where(e != 0, m | 0x800000, m).to(tl.int64)
    tl.atomic_add(counts_ptr + idx, tl.where(mask, 1, 0).to(tl.int64), mask=mask)
    tl.atomic_add(sums_ptr + idx, sig, mask=mask)
    tl.atomic_add(bad_ptr, tl.sum(tl.where(mask & (e == 255), 1, 0).to(tl.int64), axis=0))


def histogram_stats(x: torch.Tensor, shift: int = 0) -> tuple[torch.Tensor, int] | None:
    """``(histogram_stats(x, with_logs=False, shift=shift), non-finite count)``, bit for bit the reference's: exact
    integer significand sums per regular bin (the CPU path's argument, :mod:`tailq.kernels.native`); the two
    mixed-exponent bins, when occupied, are summed again in element order by the torch reference."""
    from . import cpu

    if shift < cpu.MIN_SHIFT:
        raise ValueError(f"histogram_stats: shift must be >= {cpu.MIN_SHIFT}; got {shift}")
    flat = x.reshape(-1).contiguous()
    n, dev = flat.numel(), flat.device
    if n > 1 << 29:  # a bin's significand sum could pass 2^53 (no longer the reference's float64 sum): reference
        return None
    counts = torch.zeros(cpu.NBINS, dtype=torch.int64, device=dev)
    sig = torch.zeros(cpu.NBINS, dtype=torch.int64, device=dev)
    bad = torch.zeros(1, dtype=torch.int64, device=dev)
    t1, t2, t3 = cpu.mantissa_thresholds()
    _hist_kernel[(triton.cdiv(n, HIST_BLOCK),)](flat.view(torch.int32), n, int(shift), t1, t2, t3, counts, sig, bad,
                                                BLOCK=HIST_BLOCK)  # fmt: skip
    nbad = int(bad[0])
    if nbad:
        return counts.new_zeros(0).double(), nbad
    sums = torch.zeros(cpu.NBINS, dtype=torch.float64, device=dev)
    sums[1 : cpu.NBINS - 1] = sig[1 : cpu.NBINS - 1].to(torch.float64) * cpu._REGULAR_SCALES.to(dev)
    over = int(counts[cpu.NBINS - 1])
    return cpu._finish_bins(flat, shift, counts, sums, tiny=int(sig[0]), over=over)


def nonfinite_count(x: torch.Tensor) -> None:
    return None
