"""Per-stage time of one compressor's encode on 2^24 values, against a memory copy (numbers: BENCHMARKS.md).

Usage: .venv/bin/python benchmarks/encode_breakdown.py [--compressor tnq] [--bits 3] [--numel 16777216]
"""

import argparse
import statistics
import time

import numpy as np
import torch

import tailq
from tailq.codec import check_input
from tailq.codec.packing import pack_bits


def timed(fn, repeat: int = 3) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compressor", default="tnq")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--numel", type=int, default=1 << 24)
    a = ap.parse_args()
    x = torch.from_numpy(np.random.default_rng(0).standard_t(3.5, a.numel).astype(np.float32))
    dst = torch.empty_like(x)
    copy = timed(lambda: dst.copy_(x), 5)
    c = tailq.compressor(a.compressor, bits=a.bits)
    g = torch.Generator().manual_seed(0)
    st = c.local_stats(x)
    cb = c.codebook(st)
    codes = cb.encode(x, g)
    rows = [
        ("check_input (isfinite)", lambda: check_input(x)),
        ("statistics", lambda: c.local_stats(x)),
        ("design from statistics (cached)", lambda: c.design_from_stats(st)),
        ("stochastic rounding", lambda: cb.encode(x, g)),
        ("  torch.rand alone", lambda: torch.rand(x.shape, generator=g)),
        ("  torch.searchsorted alone", lambda: torch.searchsorted(cb.levels, x)),
        (f"pack_bits {a.bits}", lambda: pack_bits(codes, a.bits, check=False)),
        ("full encode", lambda: c.encode(x, generator=g)),
    ]
    enc = c.encode(x, generator=g)
    rows.append(("full decode", lambda: c.decode(enc)))
    print(f"copy {copy * 1e3:.1f} ms for {a.numel} float32")
    for name, fn in rows:
        t = timed(fn)
        print(f"{name:34s} {t * 1e3:8.1f} ms  {t / copy:7.1f}× copy")


if __name__ == "__main__":
    main()
