"""``tailq bench codec``: encode/decode throughput of every compressor against a memory copy.

The reference is ``dst.copy_(src)`` of the same float32 tensor, timed in the same run, so the ratio
(compressor elements/s ÷ copy elements/s) is meaningful across machines. Each number is the median of
``repeat`` timed calls after one warm-up call. Input: Student-t (3.5 dof) values, heavy-tailed like real
gradients, so the tail fit and the design run on realistic data.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tailq.codec import compressor, list_compressors

BENCH_BITS = (2, 3, 4, 8)

# Compressors whose bit width is fixed or not a bit width: (name, [(label bits, options)]).
FIXED: dict[str, list[tuple[int | None, dict[str, Any]]]] = {
    "terngrad": [(2, {})],
    "efsign": [(1, {})],
    "topk": [(None, {"ratio": 0.01})],
}


def _time(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up (also fills design caches, as in steady-state training)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _configs(only: list[str] | None) -> list[tuple[str, int | None, dict[str, Any]]]:
    out = []
    for name, cls in list_compressors().items():
        if only and name not in only:
            continue
        if name in FIXED:
            out += [(name, b, o) for b, o in FIXED[name]]
            continue
        opt = cls.options["bits"]
        lo = 1 if opt.low is None else opt.low
        hi = 8 if opt.high is None else opt.high
        out += [(name, b, {"bits": b}) for b in BENCH_BITS if lo <= b <= hi]
    return out


def add_parser(sub: Any) -> None:
    """Register ``tailq bench`` on the CLI's subparsers (called by :mod:`tailq.cli`)."""
    s = sub.add_parser("bench", help="micro-benchmarks")
    s.add_argument("what", choices=("codec",))
    s.add_argument("--numel", type=int, default=1 << 24)
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--compressors", nargs="*", help="only these compressors")
    s.add_argument("--json", nargs="?", const="-", metavar="PATH", help="JSON to PATH (or stdout)")
    s.set_defaults(func=cmd_bench)


def cmd_bench(args: Any) -> int:
    from tailq.cli import UsageError

    if args.numel < 1:
        raise UsageError(f"--numel must be >= 1; got {args.numel}")
    if args.repeat < 1:
        raise UsageError(f"--repeat must be >= 1; got {args.repeat}")
    return run_codec_bench(numel=args.numel, repeat=args.repeat, json_out=args.json, only=args.compressors)


def run_codec_bench(
    numel: int = 1 << 24, repeat: int = 3, json_out: str | None = None, only: list[str] | None = None
) -> int:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=json_out == "-", width=None if sys.stdout.isatty() else 130)
    if only:
        unknown = sorted(set(only) - set(list_compressors()))
        if unknown:
            raise ValueError(f"unknown compressor(s) {unknown}; available: {sorted(list_compressors())}")
    x = torch.from_numpy(np.random.default_rng(0).standard_t(3.5, numel).astype(np.float32))
    dst = torch.empty_like(x)
    t_copy = _time(lambda: dst.copy_(x), max(repeat, 5))
    copy_eps = numel / t_copy
    results: list[dict[str, Any]] = []
    for name, bits, opts in _configs(only):
        comp = compressor(name, **opts)
        g = torch.Generator().manual_seed(1)
        enc = comp.encode(x, generator=g)
        t_enc = _time(functools.partial(comp.encode, x, generator=g), repeat)
        t_dec = _time(functools.partial(comp.decode, enc), repeat)
        row: dict[str, Any] = {
            "compressor": name,
            "bits": bits,
            "options": opts,
            "path": "reference",
            "encode_elements_per_s": numel / t_enc,
            "decode_elements_per_s": numel / t_dec,
            "encode_ratio_to_copy": (numel / t_enc) / copy_eps,
            "decode_ratio_to_copy": (numel / t_dec) / copy_eps,
            "wire_bits_per_coord": enc.bits_per_coord(),
        }
        results.append(row)
        con.print(
            f"{name:>13} bits={bits!s:>4}  encode {row['encode_elements_per_s']:.3e}/s "
            f"({row['encode_ratio_to_copy']:.3f}× copy)  decode {row['decode_elements_per_s']:.3e}/s "
            f"({row['decode_ratio_to_copy']:.3f}× copy)"
        )
    report = {
        "numel": numel,
        "repeat": repeat,
        "copy_elements_per_s": copy_eps,
        "copy_gb_per_s": 2 * 4 * copy_eps / 1e9,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
        },
        "results": results,
    }
    table = Table(title=f"codec throughput, {numel} float32 elements; copy = {copy_eps:.3e} elements/s")
    for col in (
        "compressor",
        "bits",
        "path",
        "encode el/s",
        "enc/copy",
        "decode el/s",
        "dec/copy",
        "wire bits",
    ):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["compressor"],
            str(r["bits"]),
            r["path"],
            f"{r['encode_elements_per_s']:.3e}",
            f"{r['encode_ratio_to_copy']:.3f}",
            f"{r['decode_elements_per_s']:.3e}",
            f"{r['decode_ratio_to_copy']:.3f}",
            f"{r['wire_bits_per_coord']:.3f}",
        )
    con.print(table)
    if json_out == "-":
        print(json.dumps(report, indent=2))
    elif json_out:
        with open(json_out, "w") as fh:
            json.dump(report, fh, indent=2)
        con.print(f"wrote {json_out}")
    return 0
