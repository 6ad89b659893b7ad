"""Fast paths for the baseline compressors: QSGD / NUQSGD, TernGrad and EF-signSGD (encode and decode).

Each function returns the result, or ``None`` when no fast path applies (then the codec runs its plain-torch
reference, which gives the same bits). Path selection, the small-tensor cut-off and the fallback on failure are
those of :mod:`tailq.kernels.dispatch` (:func:`~tailq.kernels.dispatch.path_for`; a failing path is switched off
for the whole process, logged once, in the same table as the codebook kernels').

What is fused and what is not. The per-bucket reductions whose float64 rounding depends on the reduction order
stay the reference's own torch ops, called by the codec on the same tensors: QSGD's L2 norms
(``torch.linalg.vector_norm(..., dtype=float64)`` then ``round_up_f32``), TernGrad's clipping thresholds (float64
``nanmean`` of the values and of the squared deviations) and EF-sign's ``sum(|x|, float64)``. Their results
are bit-identical only when computed the same way, and torch's order is its own (vectorized, split across threads
by size). Everything after them is one compiled pass per element (the codes, one byte each, into a reused
workspace) plus the shared dense packing pass of :mod:`tailq.kernels.cpu`: for QSGD ``|x| / norm``, the
stochastic rounding of :func:`tailq.kernels.cpu._round` (``affine`` for QSGD's uniform levels, the level search
for NUQSGD), the sign and the offset; for TernGrad the clip, ``|g| / scale``, the counter uniform and the sign
(its per-group ``max |g|`` is an order-free reduction, so it is compiled too); for EF-sign the sign bit. Decoding
is the shared unpacking pass plus one compiled pass (level, sign, times the bucket's scale) into ``out``.

The float32 arithmetic is the reference's, operation for operation (divisions stay divisions: the divisors are
tensor arguments, so inductor does not turn them into multiplications by a reciprocal). The element index of the
counter hash is the position in the flat tensor, as in :func:`tailq.kernels.rng.counter_uniform`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import dispatch
from .rng import RandKey
from .spec import RoundSpec

__all__ = [
    "efsign_decode",
    "efsign_encode",
    "flat_out",
    "qsgd_decode",
    "qsgd_encode",
    "terngrad_decode",
    "terngrad_encode",
]


def _resolve(path: str, op: str) -> Callable[..., Any]:
    if path == "compiled":
        return _COMPILED[op]
    from . import triton_baselines

    return getattr(triton_baselines, op)  # type: ignore[no-any-return]


def _run(device: torch.device, numel: int, op: str, *args: Any) -> Any:
    """:func:`tailq.kernels.dispatch._run` for the operations of this module (same selection, same fallback)."""
    return dispatch._run(device, numel, op, *args, resolve=_resolve)


def _scales_ok(t: torch.Tensor, count: int, device: torch.device) -> bool:
    return t.dtype == torch.float32 and t.numel() == count and t.device == device


def _packed_ok(packed: torch.Tensor, bits: int, n: int) -> bool:
    return n > 0 and packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8


def flat_out(out: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A decode's ``out`` as a flat float32 view of ``n`` elements, or None (no ``out``, or one a kernel cannot
    write: not contiguous or not float32; the reference then writes into it). ValueError on a wrong size."""
    if out is None:
        return None
    if out.numel() != n:
        raise ValueError(f"decode: out has {out.numel()} elements; the encoding has {n}")
    return out.view(-1) if out.is_contiguous() and out.dtype == torch.float32 else None


# ---------------------------------------------------------------------------------------------------------
# operations (None = use the reference)


def qsgd_encode(
    x: torch.Tensor, norms: torch.Tensor, key: RandKey, bits: int, bucket: int, levels: torch.Tensor | None
) -> torch.Tensor | None:
    """QSGD / NUQSGD codes ``sign(x)·k + s`` packed at ``bits`` bits (``pack_bits``' bytes), ``k`` the stochastic
    rounding of ``|x| / norm`` (its bucket's float32 norm, 1 where the norm is 0): onto ``{0, 1/s, .., 1}`` from
    ``|x|/norm · s`` (QSGD, ``levels=None``) or onto the increasing float32 ``levels`` (NUQSGD)."""
    n = x.numel()
    if not dispatch._eligible(x) or not 2 <= bits <= 8 or bucket < 1:
        return None
    if not _scales_ok(norms, -(-n // bucket), x.device):
        return None
    out: torch.Tensor | None = _run(x.device, n, "qsgd_encode", x, norms.contiguous(), key, bits, bucket, levels)
    return out


def qsgd_decode(
    packed: torch.Tensor, norms: torch.Tensor, bits: int, bucket: int, n: int, levels: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """``where(c < 0, -m, m) · norm`` with ``c = unpack_bits(packed) - s`` and ``m`` the level of ``|c|``
    (``|c| / s`` in float32 for QSGD, ``levels[|c|]`` for NUQSGD), written into ``out`` when given."""
    if not _packed_ok(packed, bits, n) or not 2 <= bits <= 8 or bucket < 1:
        return None
    if not _scales_ok(norms, -(-n // bucket), packed.device) or not dispatch._out_ok(out, n, packed.device):
        return None
    res: torch.Tensor | None = _run(
        packed.device, n, "qsgd_decode", packed, norms.contiguous(), bits, bucket, n, levels, out
    )
    return res


def terngrad_encode(
    x: torch.Tensor, thresholds: torch.Tensor, key: RandKey, bucket: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """TernGrad: ``(codes packed at 2 bits, per-group scales)``. Per group (``bucket`` elements, the last one
    shorter) ``g = clamp(x, -t, t)`` (``t`` its float32 threshold, inf = no clipping), scale ``S = max |g|``,
    code ``sign(g)·[u < |g| / S] + 1`` with ``u`` the counter uniform of the element."""
    n = x.numel()
    if not dispatch._eligible(x) or bucket < 1 or not _scales_ok(thresholds, -(-n // bucket), x.device):
        return None
    out: tuple[torch.Tensor, torch.Tensor] | None = _run(
        x.device, n, "terngrad_encode", x, thresholds.contiguous(), key, bucket
    )
    return out


def terngrad_decode(
    packed: torch.Tensor, scales: torch.Tensor, bucket: int, n: int, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``(unpack_bits(packed, 2) - 1) · scale`` as float32, written into ``out`` when given."""
    if not _packed_ok(packed, 2, n) or bucket < 1 or not _scales_ok(scales, -(-n // bucket), packed.device):
        return None
    if not dispatch._out_ok(out, n, packed.device):
        return None
    res: torch.Tensor | None = _run(packed.device, n, "terngrad_decode", packed, scales.contiguous(), bucket, n, out)
    return res


def efsign_encode(x: torch.Tensor) -> torch.Tensor | None:
    """EF-sign: the bits ``x >= 0`` packed (``pack_bits(.., 1)``)."""
    if not dispatch._eligible(x):
        return None
    out: torch.Tensor | None = _run(x.device, x.numel(), "efsign_encode", x)
    return out


def efsign_decode(
    packed: torch.Tensor, scale: torch.Tensor, n: int, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``(2·bit - 1) · scale`` as float32, written into ``out`` when given."""
    if not _packed_ok(packed, 1, n) or not _scales_ok(scale, 1, packed.device):
        return None
    if not dispatch._out_ok(out, n, packed.device):
        return None
    res: torch.Tensor | None = _run(packed.device, n, "efsign_decode", packed, scale.reshape(1), n, out)
    return res


# ---------------------------------------------------------------------------------------------------------
# compiled CPU implementations (torch.compile / inductor, in the style of tailq.kernels.cpu)


def _f32(v: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


def _i32(v: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32, device=device)


def _qsgd_params(s: int, levels: torch.Tensor | None, device: torch.device) -> tuple[str, dict[str, torch.Tensor]]:
    from . import cpu

    if levels is None:  # QSGD: affine rounding of |x|/norm·s onto 0..s (low 0, step 1, as the reference calls it)
        p = {"low": _f32(0.0, device), "inv": _f32(1.0, device), "smax": _f32(float(s), device),
             "smax1": _f32(float(s - 1), device)}  # fmt: skip
        mode = "affine"
    else:
        spec = RoundSpec.for_rounding(levels, False)
        mode = cpu.round_mode(spec)
        p = cpu._params(spec, device)
    p["sf"] = _f32(float(s), device)
    p["si"] = _i32(s, device)
    return mode, p


def _qsgd_codes_fn(mode: str) -> Callable[..., Any]:
    from .cpu import _round

    def qsgd_codes(x: torch.Tensor, nrm: torch.Tensor, base: torch.Tensor, kw: torch.Tensor,
                   p: dict[str, torch.Tensor], out: torch.Tensor) -> None:  # fmt: skip
        idx = _index2d(x, base)
        r = x.abs() / torch.where(nrm > 0, nrm, torch.ones_like(nrm))
        if mode == "affine":
            k = _round(r * p["sf"], idx, kw, p, mode)
        else:  # the level search on the flattened block (on the 2-D one inductor's loop was ~25x slower)
            k = _round(r.reshape(-1), idx.reshape(-1), kw, p, mode).view(x.shape)
        out.copy_((torch.where(x < 0, -k, k) + p["si"]).to(out.dtype))

    return qsgd_codes


def _index2d(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """int32 flat element indices of a (rows, cols) block that starts at element ``base``."""
    rows, cols = x.shape
    r = torch.arange(rows, dtype=torch.int32, device=x.device)[:, None] * cols
    return r + torch.arange(cols, dtype=torch.int32, device=x.device)[None, :] + base


def _plane(t: torch.Tensor, rows: int, cols: int, start: int = 0) -> torch.Tensor:
    """A (rows, cols) row-major tensor over 1-D ``t`` from element ``start`` on (not a view; see cpu._alias)."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset() + start, (rows, cols), (cols, 1)
    )


def _by_buckets(n: int, b: int, call: Callable[[int, int, int, int], None]) -> None:
    """``call(start, rows, cols, first_bucket)``: once for the full buckets as a (n // b, b) block, once for the
    last, shorter bucket as a (1, n % b) block. Per-bucket values then broadcast along a row: a gather by
    ``index // b`` in one flat pass was 5-6x slower (inductor emits it as scalar loads and divisions)."""
    full = n // b
    if full:
        call(0, full, b, 0)
    if n - full * b:
        call(full * b, 1, n - full * b, full)


def _pack_codes(codes_fn: Callable[..., None], n: int, bits: int, device: torch.device) -> torch.Tensor:
    """Run ``codes_fn(dest)`` (one byte per code into ``dest``) and pack densely at ``bits`` (cpu's pack pass)."""
    from . import cpu

    if bits == 8:  # the one-byte codes are the packed bytes
        out = torch.empty(n, dtype=torch.uint8, device=device)
        codes_fn(out)
        return out
    m32 = -(-n // 32)
    ws = cpu._workspace("codes", m32 * 32, torch.uint8, device)
    codes_fn(cpu._alias(ws, n))
    ws[n:].zero_()
    words = torch.empty(m32 * bits, dtype=torch.int32, device=device)
    cpu._compile(("pack", bits), cpu._pack_fn(bits))(ws, words)
    return cpu._alias(words, (n * bits + 7) // 8, torch.uint8)


def _unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """One byte per code (a reused workspace of ``n`` bytes) from ``bits``-bit dense codes (cpu's unpack pass)."""
    from . import cpu

    m32 = -(-n // 32)
    ws = cpu._workspace("codes", m32 * 32, torch.uint8, packed.device)
    cpu._unpack_to_codes(packed, bits, n, ws)
    return cpu._alias(ws, n)


def _cpu_qsgd_encode(
    x: torch.Tensor, norms: torch.Tensor, key: RandKey, bits: int, bucket: int, levels: torch.Tensor | None
) -> torch.Tensor:
    from . import cpu

    n, dev = x.numel(), x.device
    s = 2 ** (bits - 1) - 1
    mode, p = _qsgd_params(s, levels, dev)
    fn = cpu._compile(("qsgd_codes", mode), _qsgd_codes_fn(mode))
    xs, kw = cpu._alias(x, n), cpu._kw(key, dev)

    def codes(dest: torch.Tensor) -> None:
        def block(start: int, rows: int, cols: int, b0: int) -> None:
            fn(_plane(xs, rows, cols, start), _plane(norms, rows, 1, b0), _i32(start, dev), kw, p,
               _plane(dest, rows, cols, start))  # fmt: skip

        _by_buckets(n, bucket, block)

    return _pack_codes(codes, n, bits, dev)


def _qsgd_decode_fn(nuq: bool) -> Callable[..., Any]:
    def qsgd_values(codes: torch.Tensor, nrm: torch.Tensor, d: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        c = codes.to(torch.int32) - d["si"]
        a = c.abs()
        mag = d["levels"][a.to(torch.int64)] if nuq else a.to(torch.float32) / d["sf"]
        out.copy_(torch.where(c < 0, -mag, mag) * nrm)

    return qsgd_values


def _cpu_qsgd_decode(
    packed: torch.Tensor, norms: torch.Tensor, bits: int, bucket: int, n: int, levels: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    from . import cpu

    dev = packed.device
    s = 2 ** (bits - 1) - 1
    codes = _unpack_codes(packed, bits, n)
    out = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    d = {"si": _i32(s, dev), "sf": _f32(float(s), dev)}
    if levels is not None:
        d["levels"] = levels.to(device=dev, dtype=torch.float32)
    fn = cpu._compile(("qsgd_values", levels is not None), _qsgd_decode_fn(levels is not None))
    flat = cpu._alias(out, n)

    def block(start: int, rows: int, cols: int, b0: int) -> None:
        fn(_plane(codes, rows, cols, start), _plane(norms, rows, 1, b0), d, _plane(flat, rows, cols, start))

    _by_buckets(n, bucket, block)
    return out


def _tern_amax_fn() -> Callable[..., Any]:
    def tern_amax(x: torch.Tensor, te: torch.Tensor, out: torch.Tensor) -> None:  # x (groups, b), te (groups, 1)
        out.copy_(torch.maximum(torch.minimum(x, te), -te).abs().amax(dim=1))

    return tern_amax


def _tern_codes_fn() -> Callable[..., Any]:
    from .cpu import _uniform

    def tern_codes(x: torch.Tensor, te: torch.Tensor, se: torch.Tensor, base: torch.Tensor, kw: torch.Tensor,
                   out: torch.Tensor) -> None:  # fmt: skip
        idx = _index2d(x, base)
        g = torch.maximum(torch.minimum(x, te), -te)
        p = g.abs() / torch.where(se > 0, se, torch.ones_like(se))
        keep = (_uniform(idx, kw) < p).to(torch.int32)
        out.copy_((torch.where(g < 0, -keep, keep) + 1).to(out.dtype))

    return tern_codes


def terngrad_scales(x: torch.Tensor, thresholds: torch.Tensor, bucket: int) -> torch.Tensor:
    """Per-group ``max |clamp(x, -t, t)|`` (float32; max is exact in any order): compiled over the full groups,
    plain torch over the last, shorter one."""
    from . import cpu

    n, dev = x.numel(), x.device
    full = n // bucket
    nb = thresholds.numel()
    scales = torch.empty(nb, dtype=torch.float32, device=dev)
    if full:
        fn = cpu._compile(("tern_amax",), _tern_amax_fn())
        fn(_plane(x, full, bucket), _plane(thresholds, full, 1), cpu._alias(scales, full))
    if full < nb:
        tail = x[full * bucket :]
        t = thresholds[full:]
        scales[full:] = torch.maximum(torch.minimum(tail, t), -t).abs().amax()
    return scales


def _cpu_terngrad_encode(
    x: torch.Tensor, thresholds: torch.Tensor, key: RandKey, bucket: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import cpu

    n, dev = x.numel(), x.device
    xs = cpu._alias(x, n)
    scales = terngrad_scales(xs, thresholds, bucket)
    fn = cpu._compile(("tern_codes",), _tern_codes_fn())
    kw = cpu._kw(key, dev)

    def codes(dest: torch.Tensor) -> None:
        def block(start: int, rows: int, cols: int, b0: int) -> None:
            fn(_plane(xs, rows, cols, start), _plane(thresholds, rows, 1, b0), _plane(scales, rows, 1, b0),
               _i32(start, dev), kw, _plane(dest, rows, cols, start))  # fmt: skip

        _by_buckets(n, bucket, block)

    return _pack_codes(codes, n, 2, dev), scales


def _tern_decode_fn() -> Callable[..., Any]:
    def tern_values(codes: torch.Tensor, sc: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_((codes.to(torch.float32) - 1.0) * sc)

    return tern_values


def _cpu_terngrad_decode(
    packed: torch.Tensor, scales: torch.Tensor, bucket: int, n: int, out: torch.Tensor | None
) -> torch.Tensor:
    from . import cpu

    dev = packed.device
    codes = _unpack_codes(packed, 2, n)
    out = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    fn = cpu._compile(("tern_values",), _tern_decode_fn())
    flat = cpu._alias(out, n)

    def block(start: int, rows: int, cols: int, b0: int) -> None:
        fn(_plane(codes, rows, cols, start), _plane(scales, rows, 1, b0), _plane(flat, rows, cols, start))

    _by_buckets(n, bucket, block)
    return out


def _sign_codes_fn() -> Callable[..., Any]:
    def sign_codes(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_((x >= 0).to(out.dtype))

    return sign_codes


def _cpu_efsign_encode(x: torch.Tensor) -> torch.Tensor:
    from . import cpu

    n = x.numel()
    xs = cpu._alias(x, n)
    fn = cpu._compile(("sign_codes",), _sign_codes_fn())
    return _pack_codes(lambda dest: fn(xs, dest), n, 1, x.device)


def _sign_decode_fn() -> Callable[..., Any]:
    def sign_values(codes: torch.Tensor, sc: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_((2.0 * codes.to(torch.float32) - 1.0) * sc[0])

    return sign_values


def _cpu_efsign_decode(packed: torch.Tensor, scale: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    from . import cpu

    codes = _unpack_codes(packed, 1, n)
    out = torch.empty(n, dtype=torch.float32, device=packed.device) if out is None else out
    cpu._compile(("sign_values",), _sign_decode_fn())(codes, scale, cpu._alias(out, n))
    return out


_COMPILED: dict[str, Callable[..., Any]] = {
    "qsgd_encode": _cpu_qsgd_encode,
    "qsgd_decode": _cpu_qsgd_decode,
    "terngrad_encode": _cpu_terngrad_encode,
    "terngrad_decode": _cpu_terngrad_decode,
    "efsign_encode": _cpu_efsign_encode,
    "efsign_decode": _cpu_efsign_decode,
}

# the compiled implementations under the names the Triton module uses (tests call both directly)
compiled_impl: dict[str, Callable[..., Any]] = dict(_COMPILED)
