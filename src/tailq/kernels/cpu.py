"""CPU fast path: the codec hot loops written once in torch and compiled by ``torch.compile`` (inductor → C++).

Each operation is one small torch function that inductor fuses into a single vectorized, OpenMP-parallel loop
(two for dense packing: round to one byte per code, then pack). The float32 arithmetic is exactly the
reference's (:mod:`tailq.kernels.spec`; inductor compiles with ``-ffp-contract=off`` and without fast-math, so
no FMA contraction or reassociation changes a rounding), the random numbers are the counter hash of
:mod:`tailq.kernels.rng` in wrapping int32 arithmetic, and decoding is a lookup into the reference's own table.

Compiled functions are cached per (operation, scheme variant, bits or s, dtype, ...) with dynamic shapes, so a new
bucket length does not recompile; every per-call constant (levels, key words, scales) is a tensor argument for the
same reason. Each cache entry gets its own code object so dynamo's per-code recompile limit never merges them.
The first call of each entry is timed (trace + compile + run) and recorded in :data:`COMPILE_SECONDS`.

Workspaces (the one-byte-per-code intermediate, padded inputs) are reused per thread: fresh multi-MiB buffers
cost page faults that, on the machines measured, take longer than the kernels themselves.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import native
from .rng import MIX_C1, MIX_C2, RandKey
from .spec import RoundSpec

__all__ = [
    "COMPILE_SECONDS",
    "bins_from_bits",
    "decode_dense",
    "decode_dense_mean",
    "decode_lanes",
    "encode_dense",
    "encode_lanes",
    "histogram_stats",
    "mantissa_thresholds",
    "nonfinite_count",
    "round_codes",
]

COMPILE_SECONDS: dict[str, float] = {}  # cache key -> seconds of the first call (trace + compile + run)

# dynamic_threads: always emit an OpenMP region (inductor otherwise decides serial vs parallel from the size of the
# *first* call, so a function first called on a small bucket would stay single-threaded); indices into the small
# tables are in range by construction, so the per-element bound assertions are dropped.
_INDUCTOR_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "cpp.dynamic_threads": True,
    "assert_indirect_indexing": False,
}

_lock = threading.Lock()
_compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
_local = threading.local()


def _i32(c: int) -> int:
    """A 32-bit pattern as the signed int32 value with the same bits."""
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= 1 << 31 else c


_C1 = _i32(MIX_C1)
_C2 = _i32(MIX_C2)


# ---------------------------------------------------------------------------------------------------------
# traced building blocks (inlined by dynamo into each compiled function)


def _lowbias32(v: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors (wrapping multiplies; logical shifts via masks)."""
    v = v ^ ((v >> 16) & 0xFFFF)
    v = v * _C1
    v = v ^ ((v >> 15) & 0x1FFFF)
    v = v * _C2
    return v ^ ((v >> 16) & 0xFFFF)


def _uniform(idx: torch.Tensor, kw: torch.Tensor) -> torch.Tensor:
    """Counter uniform float32 u(i) for int32 element indices ``idx`` and int32 key words ``kw``."""
    h = _lowbias32(_lowbias32(idx ^ kw[0]) ^ kw[1])
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)


def round_mode(spec: RoundSpec) -> str:
    """Which compiled variant rounds for ``spec``: ``affine``; ``chain8`` / ``chain16`` (s <= 7 / 15: a chain of
    compares over levels padded to 8 / 16 entries, selecting l_j and w_j along the way); ``bs8`` (s <= 255: a
    branchless binary search over levels padded to 256 entries — eight gathers, which inductor emits as scalar
    loads, so 5- to 8-bit non-uniform codebooks are markedly slower). One compiled function per mode serves every
    codebook of that mode (levels, s and scales are tensor arguments)."""
    if spec.affine:
        return "affine"
    if spec.s <= 7:
        return "chain8"
    return "chain16" if spec.s <= 15 else "bs8"


_SEARCH_SIZE = {"chain8": 8, "chain16": 16, "bs8": 256}


def _round(x: torch.Tensor, idx: torch.Tensor, kw: torch.Tensor, p: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """Codes (int32) of float32 ``x`` at element indices ``idx`` (RoundSpec arithmetic, see the module doc).

    Levels sit in ``p["search"]`` (index k: l_k for 1 <= k <= s - 1, +inf from s on, so ``j <= s - 1``).
    """
    u = _uniform(idx, kw)
    if mode == "affine":
        t = torch.minimum(torch.clamp_min((x - p["low"]) * p["inv"], 0.0), p["smax"])
        j = torch.minimum(t.floor(), p["smax1"])
        return (j + (u < (t - j)).to(torch.float32)).to(torch.int32)
    lv, wd, sr = p["levels"], p["widths"], p["search"]
    xt = torch.maximum(torch.minimum(x, p["lmax"]), p["lmin"])
    if mode.startswith("chain"):  # j = #{k : search[k] <= xt}, with lo = l_j and w = w_j selected along the way
        lo = lv[0].expand_as(xt)
        w = wd[0].expand_as(xt)
        j = torch.zeros_like(xt, dtype=torch.int32)
        for k in range(1, _SEARCH_SIZE[mode] - 1):
            ge = xt >= sr[k]
            lo = torch.where(ge, sr[k], lo)
            w = torch.where(ge, p["wsearch"][k], w)
            j = j + ge.to(torch.int32)
    else:  # branchless binary search over the padded levels
        j64 = torch.zeros_like(xt, dtype=torch.int64)
        half = _SEARCH_SIZE[mode] // 2
        while half >= 1:
            j64 = torch.where(xt >= sr[j64 + half], j64 + half, j64)
            half //= 2
        lo = lv[j64]
        w = wd[j64]
        j = j64.to(torch.int32)
    return j + ((u * w) < (xt - lo)).to(torch.int32)


def _fine(code: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return p["fine"][code.to(torch.int64)] if "fine" in p else code


def _group_pack(t: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """Four int64 chunks of 8*bits bits (8 codes each, little-endian) -> ``bits`` int32 words (32 codes)."""
    cb = 8 * bits
    words = []
    m32 = 0xFFFFFFFF
    for w in range(bits):
        acc: torch.Tensor | None = None
        for i in range(4):
            lo_bit, hi_bit = cb * i, cb * (i + 1)
            if hi_bit <= 32 * w or lo_bit >= 32 * (w + 1):
                continue
            sh = lo_bit - 32 * w
            if sh >= 0:
                term = (t[i] & ((1 << (32 - sh)) - 1)) << sh
            else:
                term = (t[i] >> (-sh)) & m32
            acc = term if acc is None else acc | term
        assert acc is not None
        words.append(_as_i32(acc))
    return words


def _as_i32(v: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit value -> int32 with the same bits (no overflowing cast)."""
    return torch.where(v >= (1 << 31), v - (1 << 32), v).to(torch.int32)


def _compact8(v: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 holding 8 byte-sized codes (< 2^bits) -> the 8*bits-bit little-endian concatenation (SWAR)."""
    m = (1 << bits) - 1
    hi1 = sum(m << (16 * k + 8) for k in range(4))
    lo1 = sum(0xFF << (16 * k) for k in range(4))
    t = (v & lo1) | ((v & hi1) >> (8 - bits))
    m2 = (1 << (2 * bits)) - 1
    hi2 = (m2 << 16) | (m2 << 48)
    t = (t & 0x0000FFFF0000FFFF) | ((t & hi2) >> (16 - 2 * bits))
    return (t & 0xFFFFFFFF) | ((t >> 32) << (4 * bits))


def _expand8(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_compact8`: 8*bits bits -> int64 with one code per byte."""
    m4 = (1 << (4 * bits)) - 1
    v = (t & m4) | ((t >> (4 * bits)) << 32)
    m2 = (1 << (2 * bits)) - 1
    v = (v & ((m2 << 32) | m2)) | (((v >> (2 * bits)) & ((m2 << 32) | m2)) << 16)
    m1 = (1 << bits) - 1
    mm = sum(m1 << (16 * k) for k in range(4))
    return (v & mm) | (((v >> bits) & mm) << 8)


def _group_unpack(words: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """``bits`` int64 words (unsigned 32-bit values) of 32 codes -> four int64 chunks of 8*bits bits."""
    cb = 8 * bits
    chunks = []
    for i in range(4):
        lo_bit, hi_bit = cb * i, cb * (i + 1)
        acc: torch.Tensor | None = None
        for w in range(bits):
            if hi_bit <= 32 * w or lo_bit >= 32 * (w + 1):
                continue
            sh = 32 * w - lo_bit
            term = (words[w] & ((1 << (cb - sh)) - 1)) << sh if sh >= 0 else words[w] >> (-sh)
            acc = term if acc is None else acc | term
        assert acc is not None
        chunks.append(acc & ((1 << cb) - 1))
    return chunks


# ---------------------------------------------------------------------------------------------------------
# compiled-function cache


def _compile(key: tuple[Any, ...], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=True)`` with its own code object, cached under ``key``; first call timed."""
    with _lock:
        hit = _compiled.get(key)
        if hit is not None:
            return hit
    name = "tailq_" + "_".join(str(k) for k in key).replace(".", "_").replace("-", "m")
    code = fn.__code__.replace(co_name=name)
    fresh = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    compiled = torch.compile(fresh, dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS)
    label = "/".join(str(k) for k in key)

    def run(*args: Any) -> Any:
        _sync_threads()
        return compiled(*args)

    def first_call(*args: Any) -> Any:
        t0 = time.perf_counter()
        out = run(*args)
        with _lock:
            COMPILE_SECONDS[label] = time.perf_counter() - t0
            _compiled[key] = run
        return out

    with _lock:
        _compiled.setdefault(key, first_call)
        return _compiled[key]


def _sync_threads() -> None:
    """Give this thread's OpenMP regions torch's thread count.

    The generated loops open ``#pragma omp parallel`` without a thread count, so they use the calling thread's
    OpenMP setting; ``torch.set_num_threads`` only sets the thread it is called on. The DDP hook runs kernels on
    its own worker thread, which would otherwise use every core (oversubscribing when several ranks share them).
    """
    n = torch.get_num_threads()
    if getattr(_local, "threads", None) != n:
        torch.set_num_threads(n)
        _local.threads = n


def _alias(t: torch.Tensor, numel: int, dtype: torch.dtype | None = None, byte_offset: int = 0) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements over ``t``'s storage, starting ``byte_offset`` bytes into ``t``.

    Not a view in autograd's sense (no ``_base``): dynamo guards on a view's base size, so passing slices of a
    reusable buffer would recompile whenever the buffer outgrows the slice.
    """
    dtype = t.dtype if dtype is None else dtype
    start = t.storage_offset() * t.element_size() + byte_offset
    size = torch.empty(0, dtype=dtype).element_size()
    assert start % size == 0
    return torch.empty(0, dtype=dtype, device=t.device).set_(t.untyped_storage(), start // size, (numel,), (1,))


def _workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable buffer of at least ``numel`` elements (contents undefined), as a plain tensor."""
    cache: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] | None = getattr(_local, "ws", None)
    if cache is None:
        cache = _local.ws = {}
    k = (name, dtype, device)
    buf = cache.get(k)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        cache[k] = buf
    return _alias(buf, numel)


def _params(spec: RoundSpec, device: torch.device) -> dict[str, torch.Tensor]:
    def f32(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float32, device=device)

    mode = round_mode(spec)
    p = {"low": f32(spec.low), "inv": f32(spec.inv)}
    if mode == "affine":
        p.update(smax=f32(float(spec.s)), smax1=f32(float(spec.s - 1)))
    else:
        size = _SEARCH_SIZE[mode]
        lv, wd = spec.levels, spec.widths
        search = torch.full((size,), float("inf"), dtype=torch.float32)
        search[1 : spec.s] = lv[1 : spec.s]  # l_1 .. l_{s-1}; +inf from index s on (so j <= s - 1)
        wsearch = torch.zeros(size, dtype=torch.float32)
        wsearch[1 : spec.s] = wd[1 : spec.s]
        p.update(
            levels=lv.to(device),
            widths=wd.to(device),
            search=search.to(device),
            wsearch=wsearch.to(device),
            lmin=lv[0].to(device),
            lmax=lv[spec.s].to(device),
        )
    if spec.fine is not None:
        p["fine"] = spec.fine.to(device=device, dtype=torch.int32)
    return p


def _kw(key: RandKey, device: torch.device) -> torch.Tensor:
    return torch.tensor(key.signed_words, dtype=torch.int32, device=device)


def _code_dtype(max_code: int) -> torch.dtype:
    return torch.uint8 if max_code < 256 else torch.int32


# ---------------------------------------------------------------------------------------------------------
# encode


def _codes_fn(mode: str) -> Callable[..., Any]:
    def codes(x: torch.Tensor, kw: torch.Tensor, p: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        idx = torch.arange(x.shape[0], dtype=torch.int32, device=x.device)
        out.copy_(_round(x, idx, kw, p, mode).to(out.dtype))

    return codes


def _pack_fn(bits: int) -> Callable[..., Any]:
    def pack(codes: torch.Tensor, out: torch.Tensor) -> None:
        v = codes.view(torch.int64).view(-1, 4)  # 4 groups of 8 one-byte codes = 32 codes per row
        t = [_compact8(v[:, i], bits) for i in range(4)]
        out.view(-1, bits).copy_(torch.stack(_group_pack(t, bits), dim=1))

    return pack


def round_codes(x: torch.Tensor, spec: RoundSpec, key: RandKey) -> torch.Tensor:
    """One uint8 code per element (the rounding alone)."""
    n = x.numel()
    out = torch.empty(n, dtype=torch.uint8, device=x.device)
    mode = round_mode(spec)
    _compile(("codes", mode), _codes_fn(mode))(_alias(x, n), _kw(key, x.device), _params(spec, x.device), out)
    return out


def encode_dense(x: torch.Tensor, spec: RoundSpec, key: RandKey, bits: int) -> torch.Tensor:
    """Codes of ``x`` packed densely at ``bits`` bits (the bytes of ``pack_bits``)."""
    n = x.numel()
    dev = x.device
    mode = round_mode(spec)
    if dev.type == "cpu" and native.available():
        return _native_encode(x.contiguous(), spec, key, bits, mode)
    p = _params(spec, dev)
    kw = _kw(key, dev)
    xs = _alias(x, n)
    codes = _compile(("codes", mode), _codes_fn(mode))
    if bits == 8:  # the one-byte codes are the packed bytes
        out = torch.empty(n, dtype=torch.uint8, device=dev)
        codes(xs, kw, p, out)
        return out
    m32 = -(-n // 32)
    ws = _workspace("codes", m32 * 32, torch.uint8, dev)
    codes(xs, kw, p, _alias(ws, n))
    ws[n:].zero_()
    words = torch.empty(m32 * bits, dtype=torch.int32, device=dev)
    _compile(("pack", bits), _pack_fn(bits))(ws, words)
    return _alias(words, (n * bits + 7) // 8, torch.uint8)


def _native_encode(x: torch.Tensor, spec: RoundSpec, key: RandKey, bits: int, mode: str) -> torch.Tensor:
    """The fused C round + pack (:mod:`tailq.kernels.native`): the same float32 arithmetic and tables as
    :func:`_round`, one pass, no one-byte-per-code workspace in memory."""
    cpu = torch.device("cpu")
    t1 = t2 = None
    if mode == "bs8" and spec.s <= 31:  # a 32-entry compare chain (vectorized) beats the search's gathers here
        mode = "chain32"
    if mode == "affine":
        vals = [spec.low, spec.inv, float(spec.s), float(spec.s - 1)]
    elif mode == "bs8":
        vals = [0.0]
        t1 = torch.zeros(768, dtype=torch.float32)
        t1[:256] = _params(spec, cpu)["search"]
        t1[256 : 256 + spec.s + 1] = spec.levels
        t1[512 : 512 + spec.s] = spec.widths
    else:
        size = {"chain8": 8, "chain16": 16, "chain32": 32}[mode]
        t1 = torch.full((size,), float("inf"), dtype=torch.float32)
        t1[1 : spec.s] = spec.levels[1 : spec.s]  # l_1 .. l_{s-1}; +inf from s on (so j <= s - 1)
        t2 = torch.zeros(size, dtype=torch.float32)
        t2[1 : spec.s] = spec.widths[1 : spec.s]
        vals = [float(spec.levels[0]), float(spec.levels[spec.s]), float(spec.widths[0])]
    params = torch.tensor(vals, dtype=torch.float32)
    return native.encode_dense(x, key.words, mode, params, t1, t2, spec.s, bits)


def _lanes_row_fn(mode: str) -> Callable[..., Any]:
    def lanes_row(x: torch.Tensor, kw: torch.Tensor, p: dict[str, torch.Tensor], base: torch.Tensor,
                  shift: torch.Tensor, out: torch.Tensor) -> None:  # fmt: skip
        idx = torch.arange(x.shape[0], dtype=torch.int32, device=x.device) + base
        out.copy_(out | (_fine(_round(x, idx, kw, p, mode), p).to(torch.int64) << shift))

    return lanes_row


def encode_lanes(x: torch.Tensor, spec: RoundSpec, key: RandKey, plan: Any) -> torch.Tensor:
    """Codes (fine indices for snapped codebooks) of ``x`` packed into headroom lanes (``pack_lanes``).

    One compiled pass per lane row (row j: elements j*nw .. j*nw + nw - 1, ORed into lane j of every word). A
    single 2-D pass reducing over the lanes was 5-10x slower: inductor vectorizes that reduction poorly.
    """
    n = x.numel()
    dev = x.device
    nw = plan.words_for(n)
    words = torch.zeros(nw, dtype=torch.int64, device=dev)
    mode = round_mode(spec)
    kw, p = _kw(key, dev), _params(spec, dev)
    fn = _compile(("lanes_row", mode, spec.fine is not None), _lanes_row_fn(mode))
    for j in range(plan.lanes_per_word):
        cnt = min(nw, n - j * nw)
        if cnt <= 0:
            break
        base = torch.tensor(j * nw, dtype=torch.int32, device=dev)
        shift = torch.tensor(j * plan.lane_bits, dtype=torch.int64, device=dev)
        fn(_alias(x, cnt, byte_offset=4 * j * nw), kw, p, base, shift, _alias(words, cnt))
    return words if plan.dtype == torch.int64 else words.to(plan.dtype)


# ---------------------------------------------------------------------------------------------------------
# decode


def _unpack_fn(bits: int) -> Callable[..., Any]:
    def unpack(words: torch.Tensor, out: torch.Tensor) -> None:
        w = words.view(-1, bits).to(torch.int64) & 0xFFFFFFFF
        chunks = _group_unpack([w[:, k] for k in range(bits)], bits)
        out.view(torch.int64).view(-1, 4).copy_(torch.stack([_expand8(c, bits) for c in chunks], dim=1))

    return unpack


CHAIN_DECODE_MAX_S = 15  # decode by a chain of selects up to this many intervals, by a gather beyond


def _decode_mode(spec: RoundSpec) -> str:
    """``affine`` (verified arithmetic), ``chain8`` / ``chain16`` (selects over a table padded to 8 / 16 values),
    or ``gather`` (a table lookup; slow in inductor's C++, used beyond 15 intervals)."""
    if spec.dec_affine:
        return "affine"
    if spec.s <= 7:
        return "chain8"
    return "chain16" if spec.s <= CHAIN_DECODE_MAX_S else "gather"


_CHAIN_SIZE = {"chain8": 8, "chain16": 16}


def _dec_params(spec: RoundSpec, device: torch.device) -> dict[str, torch.Tensor]:
    values = spec.values
    mode = _decode_mode(spec)
    if mode in _CHAIN_SIZE:
        values = torch.cat([values, values.new_zeros(_CHAIN_SIZE[mode] - values.numel())])
    return {
        "values": values.to(device),
        "step": torch.tensor(spec.dec_step, dtype=torch.float32, device=device),
        "low": torch.tensor(spec.dec_low, dtype=torch.float32, device=device),
    }


def _value(codes: torch.Tensor, d: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """float32 decode of integer codes: arithmetic, a chain of selects, or a gather (all equal ``values[codes]``)."""
    if mode == "affine":
        return codes.to(torch.float32) * d["step"] + d["low"]
    vals = d["values"]
    if mode in _CHAIN_SIZE:  # values padded to the chain's size
        c = codes.to(torch.int32)
        v = vals[0].expand(c.shape)
        for k in range(1, _CHAIN_SIZE[mode]):
            v = torch.where(c == k, vals[k], v)
        return v
    return vals[codes.to(torch.int64)]


def _lookup_fn(mode: str) -> Callable[..., Any]:
    def lookup(codes: torch.Tensor, d: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        out.copy_(_value(codes, d, mode))

    return lookup


def _mean_fn(count: int, mode: str) -> Callable[..., Any]:
    def mean(codes: torch.Tensor, d: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        n = out.shape[0]
        rows = codes.view(count, -1)  # one padded row of codes per payload
        acc = torch.zeros_like(out)
        for r in range(count):
            acc = acc + _value(rows[r, :n], d, mode)
        out.copy_(acc / float(count))

    return mean


def _unpack_to_codes(packed: torch.Tensor, bits: int, n: int, dest: torch.Tensor) -> None:
    """Dense ``bits``-bit bytes -> one byte per code in ``dest`` (length a multiple of 32, >= n)."""
    if bits == 8:
        dest[:n].copy_(packed.reshape(-1))
        return
    m32 = dest.numel() // 32
    flat = packed.reshape(-1)
    if flat.numel() == m32 * bits * 4 and flat.is_contiguous() and flat.data_ptr() % 4 == 0:
        words = _alias(flat, m32 * bits, torch.int32)  # whole rows of 32 codes, aligned: no copy
    else:
        wsb = _workspace("packed", m32 * bits * 4, torch.uint8, packed.device)
        wsb[: flat.numel()].copy_(flat)
        wsb[flat.numel() :].zero_()
        words = _alias(wsb, m32 * bits, torch.int32)
    _compile(("unpack", bits), _unpack_fn(bits))(words, dest)


def decode_dense(
    packed: torch.Tensor, spec: RoundSpec, bits: int, n: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``values[unpack_bits(packed, bits, n)]`` as float32 (into ``out`` when given)."""
    dev = packed.device
    if dev.type == "cpu" and native.available():
        out = torch.empty(n, dtype=torch.float32) if out is None else out
        return native.decode_dense([packed.reshape(-1).contiguous()], bits, n, spec.values.contiguous(), out)
    m32 = -(-n // 32)
    ws = _workspace("codes", m32 * 32, torch.uint8, dev)
    _unpack_to_codes(packed, bits, n, ws)
    out = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    mode = _decode_mode(spec)
    _compile(("lookup", mode), _lookup_fn(mode))(_alias(ws, n), _dec_params(spec, dev), _alias(out, n))
    return out


def decode_dense_mean(
    payloads: Sequence[torch.Tensor], spec: RoundSpec, bits: int, n: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over payloads of ``values[unpack_bits(p, bits, n)]``, summed in order from 0.0 (the reference)."""
    dev = payloads[0].device
    if dev.type == "cpu" and native.available():
        out = torch.empty(n, dtype=torch.float32) if out is None else out
        flat = [p.reshape(-1).contiguous() for p in payloads]
        return native.decode_dense(flat, bits, n, spec.values.contiguous(), out)
    count = len(payloads)
    m32 = -(-n // 32)
    ws = _workspace("codes_n", count * m32 * 32, torch.uint8, dev)
    for r, p in enumerate(payloads):
        _unpack_to_codes(p, bits, n, _alias(ws, m32 * 32, byte_offset=r * m32 * 32))
    out = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    mode = _decode_mode(spec)
    _compile(("mean", count, mode), _mean_fn(count, mode))(ws, _dec_params(spec, dev), _alias(out, n))
    return out


def _lanes_decode_fn() -> Callable[..., Any]:
    def lanes_decode(words: torch.Tensor, shift: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor,
                     low: torch.Tensor, out: torch.Tensor) -> None:  # fmt: skip
        tot = (words.to(torch.int64) >> shift) & mask
        out.copy_((tot.to(torch.float64) * scale + low).to(torch.float32))

    return lanes_decode


def decode_lanes(
    words: torch.Tensor, plan: Any, n: int, low: float, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(unpack_lanes(words, plan, n).double() * scale + low).float()`` (SnappedCodebook.decode_sum), one
    compiled pass per lane row."""
    dev = words.device
    out = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    mask = torch.tensor((1 << plan.lane_bits) - 1, dtype=torch.int64, device=dev)
    sc = torch.tensor(scale, dtype=torch.float64, device=dev)
    lo = torch.tensor(low, dtype=torch.float64, device=dev)
    nw = words.numel()
    w = words.contiguous()
    fn = _compile(("lanes_decode", words.dtype), _lanes_decode_fn())
    for j in range(plan.lanes_per_word):
        cnt = min(nw, n - j * nw)
        if cnt <= 0:
            break
        shift = torch.tensor(j * plan.lane_bits, dtype=torch.int64, device=dev)
        fn(_alias(w, cnt), shift, mask, sc, lo, _alias(out, cnt, byte_offset=4 * j * nw))
    return out


# ---------------------------------------------------------------------------------------------------------
# statistics

HIST_CHUNK = 1 << 20  # elements per chunk of the histogram (its float64 workspace stays in the cache)


def _hist_fn() -> Callable[..., Any]:
    def hist(x: torch.Tensor, thr: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, idx_out: torch.Tensor,
             w_out: torch.Tensor) -> torch.Tensor:
        b = x.view(torch.int32) & 0x7FFFFFFF
        e = b >> 23
        m = b & 0x7FFFFF
        idx = bins_from_bits(e - shift, m, thr)  # the bin of |x|·2^-shift: its exponent minus the shift
        idx_out.copy_(idx.to(torch.uint8))
        w_out.copy_(x.abs().to(torch.float64) * scale)  # scale = 2^-shift: exact in float64
        bad = (e == 255).sum()
        tiny = ((idx == 0) & (b != 0)).sum()  # non-zero magnitudes in the zero bin
        over = (idx == _HIST_OVER).sum()
        return torch.stack([bad, tiny, over])

    return hist


def _finite_fn() -> Callable[..., Any]:
    def nonfinite(x: torch.Tensor) -> torch.Tensor:
        return ((x.view(torch.int32) & 0x7F800000) == 0x7F800000).sum()

    return nonfinite


def nonfinite_count(x: torch.Tensor) -> int:
    """Number of NaN/Inf entries of a float32 tensor (one C or compiled reduction)."""
    if x.device.type == "cpu" and native.available():
        return native.nonfinite_count(x.contiguous())
    return int(_compile(("nonfinite",), _finite_fn())(_alias(x.contiguous(), x.numel())))


def histogram_stats(x: torch.Tensor, shift: int = 0) -> tuple[torch.Tensor, int]:
    """``(histogram_stats(x, with_logs=False, shift=shift), number of non-finite entries)`` — the same vector.

    One compiled pass per chunk computes the bin index from the float's exponent and mantissa (no logarithm)
    and |x| in float64; ``torch.bincount`` adds them up. Within a regular bin every |x| has the same binary
    exponent, so every partial sum is an integer multiple of one ulp below 2^53 and the float64 sum is exact in
    any order: the result equals the reference's sequential sum bit for bit. The zero bin (non-zero |x| < 2^-40)
    and the overflow bin (|x| >= 2^16) mix exponents; when they are occupied their sums are redone in element
    order, exactly as the reference adds them.

    ``shift`` (the octave shift): bins of |x|·2^-shift, from the exponent minus ``shift``, and sums of
    |x|·2^-shift (exact in float64). Subnormal inputs have no implicit leading bit, so a shift that could bin one
    into a regular bin (``shift < MIN_SHIFT``) is refused: the dispatcher leaves such a call to the reference.
    """
    from tailq.theory.histogram import HIST_NBINS

    if shift < MIN_SHIFT:
        raise ValueError(f"histogram_stats: shift must be >= {MIN_SHIFT} (subnormals stay in the zero bin); "
                         f"got {shift}")
    flat = x.reshape(-1)
    n = flat.numel()
    dev = flat.device
    if dev.type == "cpu" and n <= native.MAX_NUMEL and native.available():
        counts, sig, bad = native.histogram_bits(flat.contiguous(), int(shift), _threshold_ints())
        if bad:
            return counts.new_zeros(0).double(), bad
        sums = torch.zeros(HIST_NBINS, dtype=torch.float64)
        regular = slice(1, _HIST_OVER)
        sums[regular] = sig[regular].to(torch.float64) * _REGULAR_SCALES  # exact: integers < 2^53 times powers of two
        return _finish_bins(flat, shift, counts, sums, tiny=int(sig[0]), over=int(counts[_HIST_OVER]))
    thr = _thresholds(dev)
    sh = torch.tensor(int(shift), dtype=torch.int32, device=dev)
    scale = torch.tensor(2.0 ** -int(shift), dtype=torch.float64, device=dev)
    chunk = min(n, HIST_CHUNK)
    idx_ws = _workspace("hist_idx", chunk, torch.uint8, dev)
    w_ws = _workspace("hist_w", chunk, torch.float64, dev)
    fn = _compile(("hist",), _hist_fn())
    counts = torch.zeros(HIST_NBINS, dtype=torch.int64, device=dev)
    sums = torch.zeros(HIST_NBINS, dtype=torch.float64, device=dev)
    flags = torch.zeros(3, dtype=torch.int64, device=dev)
    for lo in range(0, n, chunk):
        part = flat[lo : lo + chunk]
        k = part.numel()
        iw, ww = _alias(idx_ws, k), _alias(w_ws, k)
        flags += fn(_alias(part, k), thr, sh, scale, iw, ww)
        counts += torch.bincount(iw, minlength=HIST_NBINS)  # serial loops: inductor has no histogram primitive
        sums += torch.bincount(iw, weights=ww, minlength=HIST_NBINS)
    bad, tiny, over = (int(v) for v in flags.tolist())
    if bad:
        return sums.new_zeros(0), bad
    return _finish_bins(flat, shift, counts, sums, tiny=tiny, over=over)


def _finish_bins(flat: torch.Tensor, shift: int, counts: torch.Tensor, sums: torch.Tensor, *, tiny: int, over: int
                 ) -> tuple[torch.Tensor, int]:  # fmt: skip
    """The statistics vector from exact per-bin counts and regular-bin sums: the two mixed-exponent bins' sums,
    when occupied, are redone in element order (the reference's association)."""
    dev = flat.device
    for b_idx, occupied in ((0, tiny), (_HIST_OVER, over)):
        if occupied:  # redo this bin's sum in element order (the reference's association)
            a = flat.abs().to(torch.float64)
            if shift:
                a = a * 2.0 ** -int(shift)
            sel = a[_bins_reference_mask(a, b_idx)]
            sums[b_idx] = torch.bincount(torch.zeros(sel.numel(), dtype=torch.int64, device=dev), weights=sel,
                                         minlength=1)[0]  # fmt: skip
    return torch.cat([counts.to(torch.float64), sums]).to(torch.float32), 0


_HIST_OVER = 225  # HIST_K + 1 (asserted against the theory constants in _thresholds)
NBINS = _HIST_OVER + 1
# bins 1..224: every |x|·2^-shift of bin b has the biased exponent e = (b + 347) >> 2, so the bin's sum is its
# integer significand sum times 2^(e - 150)
_REGULAR_SCALES = torch.pow(2.0, (((torch.arange(1, _HIST_OVER) + 347) >> 2) - 150).to(torch.float64))
MIN_SHIFT = -86  # from 2^-86 on, every subnormal |x| (< 2^-126) falls in the zero bin (|x|·2^-shift < 2^-40)


def _bins_reference_mask(a: torch.Tensor, b_idx: int) -> torch.Tensor:
    from tailq.theory.histogram import HIST_HI, HIST_LO

    return (a < HIST_LO) if b_idx == 0 else (a >= HIST_HI)


def bins_from_bits(e: torch.Tensor, m: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Histogram bin of |x| from its float32 biased exponent ``e`` and mantissa bits ``m`` (int32 tensors).

    Bin ``4*(e - 127 + 40) + 1 + sub`` with ``sub = #{k : mantissa >= 2^(k/4)}`` (``thr`` holds the mantissa bits of
    the smallest float32 >= 2^(1/4), 2^(1/2), 2^(3/4)); 0 below 2^-40 (``e < 87``), 225 from 2^16 on.
    """
    sub = (m >= thr[0]).to(torch.int32) + (m >= thr[1]).to(torch.int32) + (m >= thr[2]).to(torch.int32)
    idx = (e * 4 - 347 + sub).clamp(1, _HIST_OVER)
    return torch.where(e < 87, 0, idx)


def mantissa_thresholds() -> list[int]:
    """Mantissa bits (23) of the smallest float32 >= 2^(k/4), k = 1, 2, 3 (an irrational edge is never hit)."""
    import numpy as np

    out = []
    for k in (1, 2, 3):
        c = 2.0 ** (k / 4)
        f = np.float32(c)
        if float(f) < c:
            f = np.nextafter(f, np.float32(np.inf))
        out.append(int(np.array(f, dtype=np.float32).view(np.int32)) & 0x7FFFFF)
    return out


def _threshold_ints() -> tuple[int, int, int]:
    t = mantissa_thresholds()
    return t[0], t[1], t[2]


def _thresholds(device: torch.device) -> torch.Tensor:
    from tailq.theory.histogram import HIST_BINS_PER_OCTAVE, HIST_HI, HIST_K, HIST_LO

    assert HIST_K + 1 == _HIST_OVER and HIST_BINS_PER_OCTAVE == 4 and HIST_LO == 2.0**-40 and HIST_HI == 2.0**16
    return torch.tensor(mantissa_thresholds(), dtype=torch.int32, device=device)
