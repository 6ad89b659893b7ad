"""GPU check in one command: Triton kernels against the reference, codec throughput against a memory copy, the DDP
hook and the FSDP2 comm on a world-size-1 group; one JSON report.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.json                                 # one GPU
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu_check.py --device cpu --out small.json     # no GPU

``--device cuda`` (the default when CUDA is available) is the full check; ``--device cpu`` is the small mode (tiny
sizes, the Triton kernels run by Triton's interpreter, so ``TRITON_INTERPRET=1`` is required): CI runs it
(tests/kernels/test_gpu_check.py) so that this script cannot rot. Sections of the report:

* ``parity`` — every operation :mod:`tailq.kernels` sends to Triton, the kernels called directly (a fallback
  cannot hide a mismatch) on the same inputs and keys as the plain-torch reference run on the same device:
  dense encode/decode/mean decode, lane encode/decode and the rounding alone for TUQ, TNQ, TBQ and single-scale
  codebooks (small mode: TUQ, TNQ, TBQ, the rounding once per kind), the histogram statistics; QSGD, NUQSGD,
  TernGrad and EF-sign encode/decode; then every compressor with a fast path once through the codec API under
  ``tailq.kernels.use("triton")`` (no path may switch off). Bits 1, 2, 3, 4, 8 (small mode 3).
  The kernels promise bit-identical results and the parity tests (tests/kernels) compare with ``torch.equal``,
  so every comparison here is exact; ``max_abs_diff`` (float outputs) and ``mismatched`` (integer outputs) say
  by how much a failure missed. Per kernel: passed or not. (``nonfinite_count`` has no Triton kernel: one torch
  reduction on the GPU.) On a GPU each compressor's encoding is also compared with the CPU reference
  (``cross_device``, reported only: QSGD's and TernGrad's float64 reductions may round differently by device).
* ``throughput`` — TNQ, TUQ, TBQ, QSGD on the triton path at 2^20, 2^22, 2^24, 2^26 values (small mode 2^12,
  2^14): ``encode`` (the whole ``compressor.encode``), ``decode`` (``compressor.decode``), and for the shared-
  codebook ones ``round_pack`` (rounding + packing, the codebook known) and ``decode_into`` (into a preallocated
  tensor); each against ``dst.copy_(src)`` of the same float32 tensor timed right before it. Timing is
  :func:`tailq.tools.bench._time` (``tailq bench codec``'s): one warm-up call (compiles), then the median of
  ``--repeat`` calls, by CUDA events on a GPU. ``*_over_copy`` = codec time / copy time; ``*_gb_per_s`` = the
  float32 tensor's bytes (4·n) per second, the copy's too (``copy_rw_gb_per_s`` counts its read and write). Each
  row also checks the triton encoding and decoding identical to the reference's at that size.
* ``ddp`` — ``tailq.ddp_hook`` on a one-rank group (NCCL on a GPU, Gloo on CPU, file rendezvous) in a short
  DDP training loop: with one rank the hook does nothing (route ``local``: the bucket is its own mean, no
  rounding, no wire), so each bucket it returns must equal the gradients it was handed, bit for bit.
* ``fsdp`` — FSDP2 at world size 1 with ``tailq.fsdp.compress``: FSDP2 itself skips the reduce-scatter when its
  group has one rank (it copies the input), so the comm is not called (reported); then the comm called directly
  on that group, which runs the compressed route: the triton and reference outputs must be identical, and every
  output a codebook level within one level gap of the truncated input. Skipped, with the reason, where FSDP2 is
  missing or cannot shard on this device.

Exit status: 0 when every check passed (skips allowed), 1 when one failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

FULL_SIZES = (20, 22, 24, 26)
SMALL_SIZES = (12, 14)
THROUGHPUT = ("tnq", "tuq", "tbq", "qsgd")
CODEBOOK_SCHEMES = ("tuq", "tnq", "tbq", "single-scale")
SMALL_CODEBOOK_SCHEMES = ("tuq", "tnq", "tbq")  # single-scale runs TUQ's kernels (affine); it stays in the codec part
CODEC_LEVEL = ("tuq", "tnq", "tbq", "single-scale", "multi-scale", "qsgd", "nuqsgd", "terngrad", "efsign")
# Every code width is a kernel of its own to compile (and so is every int argument equal to 1: n = 1 is left to the
# CPU parity tests): these keep the first run's compile time, which dominates, to about a minute or two.
FULL_PARITY_BITS = (1, 2, 3, 4, 8)  # 3: codes straddle 32-bit words; 1, 2, 4, 8: they never do
SMALL_PARITY_BITS = (3,)  # the interpreter is slow; tests/kernels covers bits 1..8 on CPU
FULL_LENGTHS = (7, 1001, 4099, (1 << 20) + 3)
SMALL_LENGTHS = (7, 1031)
FULL_N, SMALL_N = (1 << 20) + 3, 1031  # the codec-API parity and the FSDP comm's direct call
SECTIONS = ("parity", "throughput", "ddp", "fsdp")


# ---------------------------------------------------------------------------------------------------------
# helpers


def _heavy(n: int, seed: int, dof: float = 3.5) -> Any:
    """Student-t values (heavy-tailed like gradients), float32 on the CPU."""
    import numpy as np
    import torch

    return torch.from_numpy(np.random.default_rng(seed).standard_t(dof, n).astype(np.float32))


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Parity:
    """Exact comparisons grouped by kernel. ``run(kernel, case, ref, fn, *args)`` calls ``fn(*args)`` and compares
    the result with ``ref`` (a tensor or a tuple of tensors) by ``torch.equal``; an exception fails that case."""

    def __init__(self) -> None:
        self.kernels: dict[str, dict[str, Any]] = {}

    def _row(self, kernel: str) -> dict[str, Any]:
        return self.kernels.setdefault(kernel, {"kernel": kernel, "cases": 0, "passed": True, "max_abs_diff": 0.0,
                                                "mismatched": 0, "seconds": 0.0, "failures": []})  # fmt: skip

    def fail(self, kernel: str, case: str, why: str) -> None:
        row = self._row(kernel)
        row["cases"] += 1
        row["passed"] = False
        if len(row["failures"]) < 5:
            row["failures"].append(f"{case}: {why}")

    def run(self, kernel: str, case: str, ref: Any, fn: Callable[..., Any], *args: Any) -> None:
        t0 = time.perf_counter()
        try:
            got = fn(*args)
        except Exception as e:  # noqa: BLE001 - a failing kernel is a failed case; the check goes on
            self.fail(kernel, case, _err(e))
            return
        finally:
            self._row(kernel)["seconds"] += time.perf_counter() - t0  # first calls include Triton's compile
        self.compare(kernel, case, got, ref)

    def compare(self, kernel: str, case: str, got: Any, ref: Any) -> None:
        import torch

        gots = got if isinstance(got, tuple) else (got,)
        refs = ref if isinstance(ref, tuple) else (ref,)
        row = self._row(kernel)
        why = ""
        for g, r in zip(gots, refs, strict=True):
            if g is None:
                why = "the kernel returned None"
            elif g.dtype != r.dtype or g.shape != r.shape:
                why = f"got {g.dtype} {tuple(g.shape)}, the reference {r.dtype} {tuple(r.shape)}"
            elif not torch.equal(g, r):
                if g.is_floating_point():
                    d = float((g.double() - r.double()).abs().nan_to_num(math.inf).max())
                    row["max_abs_diff"] = max(row["max_abs_diff"], d)
                else:
                    row["mismatched"] += int((g != r).sum())
                why = why or "values differ"
        if why:
            self.fail(kernel, case, why)
        else:
            row["cases"] += 1

    def report(self) -> dict[str, Any]:
        rows = list(self.kernels.values())
        return {"passed": all(r["passed"] for r in rows) and bool(rows), "kernels": rows}


# ---------------------------------------------------------------------------------------------------------
# 1. parity


def _codebook_inputs(n: int, cb: Any) -> Any:
    """Heavy-tailed values plus the hard cases: exact levels, midpoints, the clip boundaries and beyond."""
    import torch

    x = _heavy(n, seed=n) * (cb.high / 3)
    special = torch.cat([cb.levels, (cb.levels[1:] + cb.levels[:-1]) / 2, torch.tensor([cb.low * 2, cb.high * 2, 0.0])])
    k = min(n, special.numel())
    x[:k] = special[:k]
    return x


def _parity_codebook(pc: Parity, dev: Any, scheme: str, bits: int, lengths: tuple[int, ...],
                     plans: tuple[tuple[int, int | None], ...], small: bool) -> None:  # fmt: skip
    """The codebook kernels of :mod:`tailq.kernels.triton_impl` against the reference (as
    tests/kernels/test_kernels_parity.py): packed bytes, integer codes, decodes, means, lane words."""
    import torch

    import tailq
    from tailq.codec.packing import pack_bits, pack_lanes, plan_lanes, unpack_bits, unpack_lanes
    from tailq.kernels import RandKey, triton_impl, use

    comp = tailq.compressor(scheme, bits=bits)
    cb = comp.codebook(comp.local_stats(_heavy(20000, seed=bits)))
    spec = cb.round_spec
    for n in lengths:
        x = _codebook_inputs(n, cb).to(dev)
        key = RandKey(7, 1, n, bits)
        with use("reference"):
            codes = cb.encode(x, key)
            ref = pack_bits(codes, bits)
            others = [pack_bits(cb.encode(x, RandKey(7, r, n, bits)), bits) for r in (2, 3)]
            ref_dec = cb.decode(codes).to(torch.float32)
            ref_mean = torch.zeros(n, device=dev)
            for p in (ref, *others):
                ref_mean += cb.decode(unpack_bits(p, bits, n).to(torch.int64))
            ref_mean = ref_mean / 3
        case = f"bits={bits} n={n}"
        pc.run(f"{scheme}.encode_dense", case, ref, triton_impl.encode_dense, x, spec, key, bits)
        pc.run(f"{scheme}.decode_dense", case, ref_dec, triton_impl.decode_dense, ref, spec, bits, n)
        pc.run(f"{scheme}.decode_dense_mean", case, ref_mean, triton_impl.decode_dense_mean, [ref, *others], spec, bits,
               n)  # fmt: skip
        if not small:  # 8-bit packing: the interpreter's slowest kernel; small mode checks it once per kind below
            pc.run(f"{scheme}.round_codes", case, codes.to(torch.uint8), triton_impl.round_codes, x, spec, key)
    grid = cb.s if cb.uniform else min(2 ** (bits + 2) - 1, 2**16 - 1)
    snapped = cb.snap(grid)
    sspec = snapped.round_spec
    lo, hi = snapped.codebook.low, snapped.codebook.high
    for n_workers, word_bits in plans:
        plan = plan_lanes(n_workers, grid, word_bits)
        for n in lengths:
            x = _codebook_inputs(n, snapped.codebook).to(dev)
            xs = [x * (1 + 0.1 * r) for r in range(n_workers)]
            keys = [RandKey(1, r, 2, 3) for r in range(n_workers)]
            with use("reference"):
                words = [pack_lanes(snapped.encode_fine(xs[r], keys[r]), plan) for r in range(n_workers)]
                total = torch.stack(words).sum(0).to(plan.dtype)
                ref_mean = snapped.decode_sum(unpack_lanes(total, plan, n), n_workers)
            case = f"bits={bits} n={n} N={n_workers} word_bits={plan.word_bits}"
            for r in range(n_workers):
                pc.run(f"{scheme}.encode_lanes", f"{case} rank={r}", words[r], triton_impl.encode_lanes, xs[r], sspec,
                       keys[r], plan)  # fmt: skip
            pc.run(f"{scheme}.decode_lanes", case, ref_mean, triton_impl.decode_lanes, total, plan, n, lo,
                   (hi - lo) / (grid * n_workers))  # fmt: skip


def _triton_hist(h: Any, shift: int) -> Any:
    from tailq.kernels import triton_impl

    res = triton_impl.histogram_stats(h, shift)
    if res is None:
        return None
    stats, bad = res
    if bad:
        raise AssertionError(f"{bad} non-finite values reported, none present")
    return stats


def _parity_rounding_and_stats(pc: Parity, dev: Any, lengths: tuple[int, ...]) -> None:
    """The rounding alone through the codec's entry points (multi-scale, QSGD and NUQSGD use it) and the
    histogram statistics (as tests/kernels/test_kernels_stats.py: Cauchy values, zeros, subnormals, huge)."""
    import torch

    from tailq.codec.codebook import stochastic_round_levels, stochastic_round_uniform
    from tailq.codec.stats import histogram_stats
    from tailq.kernels import RandKey, dispatch, use

    lv = torch.tensor([-1.0, -0.3, 0.0, 0.2, 0.25, 1.5], dtype=torch.float32).to(dev)
    special = torch.tensor([0.0, -0.0, 1e-45, -3e-42, 2.0**-40, 7e5, -(2.0**16), 1e-30], dtype=torch.float32)
    for n in lengths:
        x = _heavy(n, seed=2).to(dev)
        xa = x.abs() * 3
        key = RandKey(2, 2, 2, 2)
        with use("reference"):
            ru = stochastic_round_uniform(xa, 0.0, 1.0, 7, key)
            rl = stochastic_round_levels(x, lv, key)
        dispatch.reset()
        with use("triton"):
            pc.run("round_codes.uniform", f"n={n}", ru, stochastic_round_uniform, xa, 0.0, 1.0, 7, key)
            pc.run("round_codes.levels", f"n={n}", rl, stochastic_round_levels, x, lv, key)
        if dispatch._broken:
            pc.fail("round_codes.levels", f"n={n}", f"the triton path switched off: {dispatch._broken}")
        h = _heavy(n, seed=n + 1, dof=1.0) * 1e-3  # Cauchy: every bin occupied somewhere
        k = min(n, special.numel())
        h[:k] = special[:k]
        h = h.to(dev)
        for shift in (0, -30, 17):
            ref = histogram_stats(h, with_logs=False, shift=shift)
            pc.run("histogram_stats", f"n={n} shift={shift}", ref, _triton_hist, h, shift)


def _heavy3(n: int, seed: int, dev: Any) -> Any:
    """Student-t(3) values with the hard cases up front (as tests/kernels/test_kernels_baselines.py)."""
    import torch

    x = _heavy(n, seed, dof=3.0)
    special = torch.tensor([0.0, -0.0, 1e30, -1e-30, 7.0, -7.0], dtype=torch.float32)
    k = min(n, special.numel())
    x[:k] = special[:k]
    return x.to(dev)


def _parity_baselines(pc: Parity, dev: Any, bits_list: tuple[int, ...], lengths: tuple[int, ...],
                      buckets: tuple[int, ...]) -> None:  # fmt: skip
    """QSGD / NUQSGD / TernGrad / EF-sign kernels of :mod:`tailq.kernels.triton_baselines` (the per-bucket
    reductions stay torch ops: the same norms, thresholds and scales go to both)."""
    from tailq.codec.efsign import EFSign
    from tailq.codec.qsgd import NUQSGD, QSGD
    from tailq.codec.terngrad import TernGrad
    from tailq.kernels import RandKey, triton_baselines, use

    for cls, name in ((QSGD, "qsgd"), (NUQSGD, "nuqsgd")):
        for bits in sorted({max(2, b) for b in bits_list}):
            for bucket in buckets:
                comp = cls(bits=bits, bucket_size=bucket)
                levels = comp._fast_levels()
                for n in lengths:
                    x = _heavy3(n, n + bits, dev) * 1e-3
                    key = RandKey(3, 1, n, bits)
                    with use("reference"):
                        ref = comp.encode(x, generator=key)
                        dec = comp.decode(ref).reshape(-1)
                    b = min(bucket, n)
                    norms = comp.norms(x)
                    codes = ref.tensors["codes"]
                    case = f"bits={bits} bucket={bucket} n={n}"
                    pc.run(f"{name}.encode", case, codes, triton_baselines.qsgd_encode, x, norms, key, bits, b, levels)
                    pc.run(f"{name}.decode", case, dec, triton_baselines.qsgd_decode, codes, norms, bits, b, n, levels)
    for opts in ({}, {"bucket_size": 100, "clip_sigma": 2.0}):
        tern = TernGrad(**opts)
        for n in lengths:
            x = _heavy3(n, n, dev)
            key = RandKey(5, 0, n, 2)
            with use("reference"):
                ref = tern.encode(x, generator=key)
                dec = tern.decode(ref).reshape(-1)
            b, _ = tern._layout(n)
            codes, scales = ref.tensors["codes"], ref.tensors["scales"]
            case = f"{opts or 'defaults'} n={n}"
            pc.run("terngrad.encode", case, (codes, scales), triton_baselines.terngrad_encode, x, tern.thresholds(x),
                   key, b)  # fmt: skip
            pc.run("terngrad.decode", case, dec, triton_baselines.terngrad_decode, codes, scales, b, n)
    ef = EFSign()
    for n in lengths:
        x = _heavy3(n, n, dev)
        with use("reference"):
            ref = ef.encode(x)
            dec = ef.decode(ref).reshape(-1)
        pc.run("efsign.encode", f"n={n}", ref.tensors["signs"], triton_baselines.efsign_encode, x)
        pc.run("efsign.decode", f"n={n}", dec, triton_baselines.efsign_decode, ref.tensors["signs"],
               ref.tensors["scale"], n)  # fmt: skip


def _parity_codec(pc: Parity, dev: Any, n: int) -> dict[str, Any]:
    """Every compressor with a fast path through the codec API: encode and decode under ``use("triton")`` give the
    reference's tensors and nothing falls back. Returns the cross-device comparison (GPU only, reported)."""
    import torch

    import tailq
    from tailq.codec import get_compressor_class
    from tailq.kernels import RandKey, dispatch, use

    cross: dict[str, bool] = {}
    x = (_heavy(n, seed=5) * 1e-2).to(dev)
    key = RandKey(0, 2, 1, 0)
    for name in CODEC_LEVEL:
        kernel, case = f"codec.{name}", f"n={n}"
        opts = {"bits": 3} if "bits" in get_compressor_class(name).options else {}
        try:
            with use("reference"):
                ref = tailq.compressor(name, **opts).encode(x, generator=key)
                dec = tailq.compressor(name, **opts).decode(ref)
            dispatch.reset()
            comp = tailq.compressor(name, **opts)
            with use("triton"):
                got = comp.encode(x, generator=key)
                got_dec = comp.decode(got)
                path = dispatch.path_for(x.device)
        except Exception as e:  # noqa: BLE001
            pc.fail(kernel, case, _err(e))
            continue
        if set(got.tensors) != set(ref.tensors):
            pc.fail(kernel, case, f"tensors {sorted(got.tensors)}, the reference's {sorted(ref.tensors)}")
            continue
        names = sorted(ref.tensors)
        pc.compare(kernel, f"{case} encode {names}", tuple(got.tensors[k] for k in names),
                   tuple(ref.tensors[k] for k in names))  # fmt: skip
        pc.compare(kernel, f"{case} decode", got_dec, dec)
        if path != "triton" or dispatch._broken:
            pc.fail(kernel, case, f"the triton path was not used (path {path}, switched off: {dispatch._broken})")
        if dev.type == "cuda":
            with use("reference"):
                cpu = tailq.compressor(name, **opts).encode(x.cpu(), generator=key)
            cross[name] = all(torch.equal(got.tensors[k].cpu(), cpu.tensors[k]) for k in names)
    return cross


def check_parity(dev: Any, small: bool, bits_list: tuple[int, ...]) -> dict[str, Any]:
    from tailq.codec import get_compressor_class

    pc = Parity()
    lengths = SMALL_LENGTHS if small else FULL_LENGTHS
    plans: tuple[tuple[int, int | None], ...] = ((2, None),) if small else ((4, None), (3, 64))
    for scheme in SMALL_CODEBOOK_SCHEMES if small else CODEBOOK_SCHEMES:
        opt = get_compressor_class(scheme).options["bits"]
        for bits in bits_list:
            if (opt.low is not None and bits < opt.low) or (opt.high is not None and bits > opt.high):
                continue
            try:
                _parity_codebook(pc, dev, scheme, bits, lengths, plans, small)
            except Exception as e:  # noqa: BLE001 - the reference side failing is a failure too
                pc.fail(f"{scheme}.setup", f"bits={bits}", _err(e))
    try:
        _parity_rounding_and_stats(pc, dev, lengths)
    except Exception as e:  # noqa: BLE001
        pc.fail("rounding-and-stats.setup", "", _err(e))
    try:
        _parity_baselines(pc, dev, bits_list, lengths, (100,) if small else (100, 512))
    except Exception as e:  # noqa: BLE001
        pc.fail("baselines.setup", "", _err(e))
    cross = _parity_codec(pc, dev, SMALL_N if small else FULL_N)
    out = pc.report()
    out["status"] = "passed" if out["passed"] else "failed"
    out.update(lengths=list(lengths), bits=list(bits_list), comparison="exact (torch.equal), as tests/kernels",
               not_triton=["nonfinite_count: one torch reduction on the device"])  # fmt: skip
    if cross:
        out["cross_device"] = {"note": "triton encoding on the GPU == the reference on the CPU (reported only)",
                               "equal": cross}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# 2. throughput


def _same_encoding(a: Any, b: Any) -> bool:
    import torch

    return set(a.tensors) == set(b.tensors) and all(
        a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


def _timed(fn: Callable[[], Any], repeat: int, dev: Any) -> tuple[float, float, Any]:
    """:func:`tailq.tools.bench._time` (median seconds after a warm-up call, the warm-up's seconds) and the last
    call's result (so the timed calls are also the ones checked)."""
    from tailq.tools.bench import _time

    box: list[Any] = [None]

    def call() -> None:
        box[0] = fn()

    t, first = _time(call, repeat, dev)
    return t, first, box[0]


def check_throughput(
    dev: Any, sizes: tuple[int, ...], repeat: int, bits: int, parts_at: tuple[int, ...], parts_for: tuple[str, ...]
) -> dict[str, Any]:
    import torch

    import tailq
    from tailq.codec import SharesCodebook
    from tailq.kernels import RandKey, dispatch, use
    from tailq.tools.bench import _time

    rows: list[dict[str, Any]] = []
    for e in sizes:
        n = 1 << e
        x = _heavy(n, seed=0).to(dev)
        dst = torch.empty_like(x)
        for name in THROUGHPUT:
            row: dict[str, Any] = {"compressor": name, "bits": bits, "numel": n, "log2_numel": e}
            try:
                t_copy, _ = _time(functools.partial(dst.copy_, x), max(repeat, 5), dev)  # right before the row (drift)
                row.update(copy_s=t_copy, copy_gb_per_s=4 * n / t_copy / 1e9, copy_rw_gb_per_s=8 * n / t_copy / 1e9)
                comp = tailq.compressor(name, bits=bits)
                key = RandKey(0, 0, 0, 0)
                timed: dict[str, float] = {}
                dispatch.reset()
                with use("triton"):
                    enc_fn = functools.partial(comp.encode, x, generator=key)
                    timed["encode"], row["first_encode_s"], enc = _timed(enc_fn, repeat, dev)
                    timed["decode"], row["first_decode_s"], dec = _timed(functools.partial(comp.decode, enc), repeat,
                                                                         dev)  # fmt: skip
                    if isinstance(comp, SharesCodebook) and e in parts_at and name in parts_for:
                        cb = comp.codebook(comp.local_stats(x))
                        rp_fn = functools.partial(cb.encode_packed, x, key, bits)
                        timed["round_pack"], _, packed = _timed(rp_fn, repeat, dev)
                        out = torch.empty(n, dtype=torch.float32, device=dev)
                        di_fn = functools.partial(cb.decode_packed, packed, bits, n, out)
                        timed["decode_into"], _, _ = _timed(di_fn, repeat, dev)
                    path = dispatch.path_for(dev)
                row["triton_path_used"] = path == "triton" and not dispatch._broken
                if dispatch._broken:
                    row["switched_off"] = dict(dispatch._broken)
                for part, t in timed.items():
                    row[f"{part}_s"] = t
                    row[f"{part}_over_copy"] = t / t_copy
                    row[f"{part}_gb_per_s"] = 4 * n / t / 1e9
                row["wire_bits_per_coord"] = enc.bits_per_coord()
                with use("reference"):
                    ref_comp = tailq.compressor(name, bits=bits)
                    ref = ref_comp.encode(x, generator=key)
                    ref_dec = ref_comp.decode(ref)
                row["identical_to_reference"] = _same_encoding(enc, ref) and bool(torch.equal(dec, ref_dec))
            except Exception as err:  # noqa: BLE001 - reported; the other rows still run
                row["error"] = _err(err)
                row["traceback"] = traceback.format_exc(limit=4)
            rows.append(row)
            _sync(dev)
    ok = all("error" not in r and r["identical_to_reference"] and r["triton_path_used"] for r in rows)
    return {"status": "passed" if ok else "failed", "passed": ok, "sizes": [1 << e for e in sizes],
            "repeat": repeat, "bits": bits,
            "timing": "CUDA events" if dev.type == "cuda" else "time.perf_counter",
            "parts_timed": {"numel": [1 << e for e in parts_at], "compressors": list(parts_for)},
            "units": "*_s: median seconds; *_over_copy: codec time / copy time; *_gb_per_s: 4·numel bytes / s "
                     "(the float32 tensor); copy_rw_gb_per_s: 8·numel / s (read + write)",
            "rows": rows}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# 3. DDP hook and 4. FSDP2 comm on a one-rank group


@contextlib.contextmanager
def _one_rank_group(dev: Any) -> Iterator[str]:
    """A world-size-1 process group in this process (NCCL on CUDA, Gloo on CPU; file rendezvous, no port)."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("a process group of more than one rank is already initialised")
        yield dist.get_backend()
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=120))  # fmt: skip
        try:
            yield backend
        finally:
            dist.destroy_process_group()


def _mlp(dev: Any) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(dev)  # fmt: skip


def _batch(step: int, dev: Any) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 64, generator=gen).to(dev), torch.randint(0, 10, (32,), generator=gen).to(dev)


def check_ddp(dev: Any, backend: str, hook_name: str, steps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import tailq
    from tailq.codec import get_compressor_class

    model = _mlp(dev)
    plain = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, device_ids=[dev.index or 0] if dev.type == "cuda" else None)
    opts = {"bits": 3} if "bits" in get_compressor_class(hook_name).options else {}
    state, hook = tailq.ddp_hook(hook_name, **opts, min_bucket=0, warmup_steps=0)
    calls: list[tuple[Any, Any]] = []

    def spy(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks these names (and the annotations: none)
        before = bucket.buffer().clone()
        fut = hook(state, bucket)
        calls.append((before, fut))
        return fut

    ddp.register_comm_hook(state, spy)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)
    exact, n_calls, grad_diff, times = True, 0, 0.0, []
    for step in range(steps):
        x, y = _batch(step, dev)
        calls.clear()
        _sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()  # DDP waits for the hook's futures before backward returns
        _sync(dev)
        times.append(time.perf_counter() - t0)
        for before, fut in calls:  # checked now: DDP reuses its bucket buffers in the next step
            out = fut.value()
            out = out[0] if isinstance(out, list) else out
            exact = exact and bool(torch.equal(out, before))
        n_calls += len(calls)
        popt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        for p, q in zip(ddp.module.parameters(), plain.parameters(), strict=True):
            grad_diff = max(grad_diff, float((p.grad - q.grad).abs().max()))
        opt.step()
        popt.step()
    routes = sorted({str(v.get("route")) for v in state.metrics.last.values()})
    hook_step = state.step
    state.close()
    passed = exact and n_calls >= steps and routes == ["local"] and hook_step == steps
    return {"status": "passed" if passed else "failed", "backend": backend, "world_size": 1, "hook": hook_name,
            "steps": steps, "hook_calls": n_calls, "hook_returned_its_input_exactly": exact, "routes": routes,
            "hook_steps": hook_step, "step_ms_median": 1e3 * sorted(times)[len(times) // 2],
            "grad_max_abs_diff_vs_plain_model": grad_diff,
            "note": "world size 1: the hook's route 'local' returns the bucket untouched (its own mean, no rounding, "
                    "no wire), so gradients are exact; the compression itself needs >= 2 ranks. The plain (non-DDP) "
                    "model's gradients are reported, not checked (same kernels, but no bitwise promise)"}  # fmt: skip


def check_fsdp(dev: Any, backend: str, steps: int, small: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import tailq.fsdp
    from tailq.kernels import dispatch, use

    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not hasattr(FSDPModule, "set_custom_reduce_scatter"):
            raise ImportError("FSDPModule.set_custom_reduce_scatter is missing (torch >= 2.9 has it)")
    except ImportError as e:
        return {"status": "skipped", "reason": f"FSDP2 is not available: {_err(e)}"}
    out: dict[str, Any] = {"backend": backend, "world_size": 1}
    model = _mlp(dev)
    plain = copy.deepcopy(model)
    try:
        for m in (model[0], model[2], model):
            fully_shard(m)
    except Exception as e:  # noqa: BLE001 - FSDP2 refusing this device/backend is a skip, with the reason
        return {"status": "skipped", "reason": f"fully_shard failed on {dev.type}/{backend}: {_err(e)}"}
    comm = tailq.fsdp.compress(model, "tnq", bits=3, min_bucket=0)
    grad_diff = 0.0
    for step in range(steps):
        x, y = _batch(step, dev)
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(plain(x), y).backward()
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            grad_diff = max(grad_diff, float((p.grad.full_tensor() - q.grad).abs().max()))
    calls = [r for r in comm.metrics.wire.records if r.kind == "payload"]
    note = ("FSDP2 did not call the comm: with one rank its foreach_reduce copies the reduce-scatter input to the "
            "output itself" if not calls else f"FSDP2 called the comm {len(calls)} times")  # fmt: skip
    out["training"] = {"steps": steps, "comm_payload_calls": len(calls), "comm_step": comm.step,
                       "grad_max_abs_diff_vs_plain_model": grad_diff,
                       "note": note + "; reported, not checked (the direct call below is)"}  # fmt: skip
    # the comm called directly on the one-rank group: the compressed route (phase 1 of two-phase) does run
    s = SMALL_N if small else FULL_N
    x = (_heavy(s, seed=11) * 1e-2).to(dev)
    res: dict[str, Any] = {}
    for path in ("reference", "triton"):
        c = tailq.fsdp.reduce_scatter("tnq", bits=3, min_bucket=0, seed=7)
        o = torch.full((s,), math.nan, device=dev)
        dispatch.reset()
        with use(path):
            c(o, x, dist.group.WORLD, dist.ReduceOp.AVG)
        res[path] = (o, c.metrics.last.get(0, {}), len(c.metrics.fallbacks), dict(dispatch._broken))
    o, last, fallbacks, broken = res["triton"]
    levels = last.get("levels")
    direct: dict[str, Any] = {"numel": s, "route": last.get("route"), "fallbacks": fallbacks,
                              "identical_to_reference_path": bool(torch.equal(o, res["reference"][0])),
                              "triton_switched_off": broken}  # fmt: skip
    if levels is not None:
        lv = levels.to(dev)
        gap = float((lv[1:] - lv[:-1]).max())
        err = float((o - x.clamp(float(lv[0]), float(lv[-1]))).abs().max())
        direct.update(max_gap=gap, max_abs_err_vs_truncated=err, within_one_gap=err <= gap,
                      outputs_are_levels=bool(torch.isin(o, lv).all()))  # fmt: skip
    passed = (direct["route"] == "reduce_scatter" and not fallbacks and not broken
              and direct["identical_to_reference_path"] and direct.get("within_one_gap", False)
              and direct.get("outputs_are_levels", False))  # fmt: skip
    out["direct_call"] = direct
    out["status"] = "passed" if passed else "failed"
    return out


# ---------------------------------------------------------------------------------------------------------
# main


def _versions(dev: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    from tailq.tools.bench import _machine

    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"device_name": name, "torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda,
            "numpy": np.__version__, "python": platform.python_version(), "machine": _machine()}  # fmt: skip


def _section(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001 - one section failing must not lose the others' results
        res = {"status": "failed", "passed": False, "error": _err(e), "traceback": traceback.format_exc(limit=6)}
    res["seconds"] = time.perf_counter() - t0
    report[name] = res
    print(f"[gpu_check] {name}: {_verdict(res)} ({res['seconds']:.1f} s)", file=sys.stderr, flush=True)


def _verdict(res: dict[str, Any]) -> str:
    if "status" in res:
        return str(res["status"])
    return "passed" if res.get("passed") else "failed"


def _summary(report: dict[str, Any]) -> str:
    lines = [f"gpu_check on {report['device']} ({report['versions']['device_name']}), mode {report['mode']}, "
             f"torch {report['versions']['torch']}, triton {report['versions']['triton']}"]  # fmt: skip
    for name in SECTIONS:
        if name not in report:
            continue
        res = report[name]
        lines.append(f"  {name}: {_verdict(res)}" + (f" — {res['reason']}" if res.get("reason") else "")
                     + (f" — {res['error']}" if res.get("error") else ""))  # fmt: skip
        if name == "parity":
            bad = [k for k in res.get("kernels", []) if not k["passed"]]
            lines.append(f"    {len(res.get('kernels', []))} kernels, {len(bad)} failed"
                         + "".join(f"\n    FAILED {k['kernel']}: {k['failures'][:2]}" for k in bad))  # fmt: skip
        if name == "throughput":
            for r in res.get("rows", []):
                if "error" in r:
                    lines.append(f"    {r['compressor']} n=2^{r['log2_numel']}: ERROR {r['error']}")
                    continue
                extra = "".join(f" {p} {r[p + '_over_copy']:.3g}x" for p in ("round_pack", "decode_into")
                                if p + "_over_copy" in r)  # fmt: skip
                lines.append(f"    {r['compressor']:>5} n=2^{r['log2_numel']}: copy {r['copy_gb_per_s']:.3g} GB/s; "
                             f"encode {r['encode_over_copy']:.3g}x copy ({r['encode_gb_per_s']:.3g} GB/s), decode "
                             f"{r['decode_over_copy']:.3g}x ({r['decode_gb_per_s']:.3g} GB/s);{extra} "
                             f"identical {r['identical_to_reference']}")  # fmt: skip
    lines.append(f"  overall: {'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.1f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="cuda (default when available): the full check; cpu: the small mode (TRITON_INTERPRET=1)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON report path ('-': the JSON on stdout, the summary "
                    "on stderr); default gpu_check.json")  # fmt: skip
    ap.add_argument("--small", action="store_true", help="small mode on cuda too (always on cpu)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help=f"log2 sizes for the throughput (default {FULL_SIZES}, small {SMALL_SIZES})")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per number (median; default 10, small 1)")
    ap.add_argument("--bits", type=int, default=3, help="bits of the throughput compressors (default 3)")
    ap.add_argument("--parity-bits", type=int, nargs="+", default=None,
                    help=f"code widths of the parity checks (default {FULL_PARITY_BITS}, small {SMALL_PARITY_BITS})")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--steps", type=int, default=3, help="training steps of the DDP and FSDP checks")
    ap.add_argument("--hook", default="tnq", help="the DDP hook's compressor (default tnq)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if args.device == "cpu" and not interpret:
        print("gpu_check: --device cpu runs the Triton kernels in Triton's interpreter: set TRITON_INTERPRET=1",
              file=sys.stderr)  # fmt: skip
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but CUDA is not available here", file=sys.stderr)
        return 2
    if device == "cuda" and interpret:
        print("gpu_check: unset TRITON_INTERPRET for --device cuda (the interpreter runs on CPU tensors)",
              file=sys.stderr)  # fmt: skip
        return 2
    if device == "cpu" and not interpret:
        print("gpu_check: no CUDA here; the CPU small mode needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if os.environ.get("TAILQ_KERNELS"):
        print(f"gpu_check: ignoring TAILQ_KERNELS={os.environ['TAILQ_KERNELS']} (paths are chosen per check)",
              file=sys.stderr)  # fmt: skip
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    small = args.small or device == "cpu"
    sizes = tuple(args.sizes or (SMALL_SIZES if small else FULL_SIZES))
    repeat = args.repeat or (1 if small else 10)
    parity_bits = tuple(args.parity_bits or (SMALL_PARITY_BITS if small else FULL_PARITY_BITS))
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "tool": "benchmarks/gpu_check.py", "device": str(dev), "mode": "small" if small else "full",
        "triton_interpret": interpret, "versions": _versions(dev),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    if small:
        report["note"] = ("small mode: tiny sizes; on CPU the Triton kernels run in the interpreter, so the times "
                          "check that the measurement runs, not the speed")  # fmt: skip
    if "parity" in args.sections:
        _section(report, "parity", lambda: check_parity(dev, small, parity_bits))
    if "throughput" in args.sections:
        # the interpreter is slow: in small mode the parts are timed once (TNQ at the smallest size), to keep it run
        parts_at, parts_for = (sizes[:1], ("tnq",)) if small else (sizes, THROUGHPUT)
        _section(report, "throughput", lambda: check_throughput(dev, sizes, repeat, args.bits, parts_at, parts_for))
    if "ddp" in args.sections or "fsdp" in args.sections:
        try:
            with _one_rank_group(dev) as backend:
                if "ddp" in args.sections:
                    _section(report, "ddp", lambda: check_ddp(dev, backend, args.hook, args.steps))
                if "fsdp" in args.sections:
                    _section(report, "fsdp", lambda: check_fsdp(dev, backend, args.steps, small))
        except Exception as e:  # noqa: BLE001 - the group itself could not be made
            for name in ("ddp", "fsdp"):
                if name in args.sections and name not in report:
                    report[name] = {"status": "failed", "error": f"process group: {_err(e)}",
                                    "traceback": traceback.format_exc(limit=6)}  # fmt: skip
    report["seconds"] = time.perf_counter() - t0
    report["passed"] = all(_verdict(report[s]) in ("passed", "skipped") for s in SECTIONS if s in report)
    text = json.dumps(report, indent=2, default=str)
    summary = _summary(report)
    if args.out == "-":
        print(text)
        print(summary, file=sys.stderr)
    else:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
        print(summary)
        print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
