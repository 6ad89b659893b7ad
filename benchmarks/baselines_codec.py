"""Encode / decode speed of the baseline compressors (QSGD, NUQSGD, TernGrad, EF-sign): plain-torch reference vs
the compiled CPU fast path (tailq.kernels.baselines), as a fraction of a memory copy's speed.

Per row: 2^24 Student-t(3.5) float32 values, a RandKey; each timing is the median of 3 runs after a warm-up (which
also compiles), and each is divided by the median of a preallocated float32 ``dst.copy_(src)`` of the same tensor
timed right next to it (so a busy machine slows both alike). ``x copy`` = copy time / op time: 1.0 means as fast as
a copy, 0.3 means 3.3x the copy's time. The ``reduction`` column times the reference's order-dependent float64
reduction that every path shares (QSGD's bucket norms, TernGrad's thresholds, EF-sign's sum |x|), and the
``check_input`` column the input validation (its finiteness check) every encode starts with: together a floor of
the encode. ``fused encode alone`` times the compiled fast path by itself, given the reduction's result.

    .venv/bin/python benchmarks/baselines_codec.py --out benchmarks/results/baselines_codec_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tailq.codec.base import check_input
from tailq.codec.efsign import EFSign
from tailq.codec.qsgd import NUQSGD, QSGD
from tailq.codec.terngrad import TernGrad
from tailq.kernels import RandKey, baselines, dispatch, use


def _median(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up (compiles on the first call)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    n = args.n
    x = torch.from_numpy(np.random.default_rng(0).standard_t(3.5, n).astype(np.float32))
    dst = torch.empty_like(x)
    out = torch.empty_like(x)
    key = RandKey(1, 0, 0, 0)

    def copy_s() -> float:
        return _median(lambda: dst.copy_(x), args.reps)

    norms = QSGD(bits=4).norms(x)
    lv = NUQSGD(bits=4).levels()
    thr = TernGrad().thresholds(x)
    inf = torch.full((1,), math.inf)
    # (name, compressor, its shared reduction, the fused fast path alone on the reduction's result)
    cases: list[tuple[str, Any, Callable[[], Any], Callable[[], Any]]] = [
        ("qsgd(bits=4, bucket=512)", QSGD(bits=4), lambda: QSGD(bits=4).norms(x),
         lambda: baselines.qsgd_encode(x, norms, key, 4, 512, None)),
        ("nuqsgd(bits=4, bucket=512)", NUQSGD(bits=4), lambda: NUQSGD(bits=4).norms(x),
         lambda: baselines.qsgd_encode(x, norms, key, 4, 512, lv)),
        ("terngrad(clip 2.5 sigma)", TernGrad(), lambda: TernGrad().thresholds(x),
         lambda: baselines.terngrad_encode(x, thr, key, n)),
        ("terngrad(no clip)", TernGrad(clip_sigma=math.inf), lambda: None,
         lambda: baselines.terngrad_encode(x, inf, key, n)),
        ("efsign", EFSign(), lambda: x.abs().sum(dtype=torch.float64), lambda: baselines.efsign_encode(x)),
    ]  # fmt: skip
    rows = []
    for name, comp, reduction, fused in cases:
        row: dict[str, Any] = {"compressor": name}
        enc = comp.encode(x, generator=key)
        for path in ("reference", "compiled"):
            with use(path):
                c1 = copy_s()
                e = _median(lambda comp=comp: comp.encode(x, generator=key), args.reps)
                c2 = copy_s()
                d = _median(lambda comp=comp, enc=enc: comp.decode(enc, out=out), args.reps)
                c3 = copy_s()
            row[f"{path}_encode_s"] = e
            row[f"{path}_decode_s"] = d
            row[f"{path}_encode_x_copy"] = statistics.median([c1, c2]) / e
            row[f"{path}_decode_x_copy"] = statistics.median([c2, c3]) / d
        c = copy_s()
        r = _median(reduction, args.reps)
        c = statistics.median([c, copy_s()])
        row["reduction_s"] = r
        row["reduction_x_copy"] = c / r if r > 1e-5 else None
        row["copy_s"] = c
        with use("compiled"):
            f = _median(fused, args.reps)
        row["fused_encode_s"] = f
        row["fused_encode_x_copy"] = c / f
        v = _median(lambda: check_input(x), args.reps)
        row["check_input_s"] = v
        row["check_input_x_copy"] = c / v
        rows.append(row)
        print(f"{name}: done", flush=True)

    print()
    print(f"n = {n} float32, median of {args.reps}, x copy = copy time / op time (higher is faster)\n")
    print("| compressor | encode ref | encode compiled | decode ref | decode compiled | shared reduction "
          "| check_input | fused encode alone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        red = "-" if row["reduction_x_copy"] is None else f"{row['reduction_x_copy']:.3f}x"
        print(
            f"| {row['compressor']} | {row['reference_encode_x_copy']:.4f}x | {row['compiled_encode_x_copy']:.3f}x "
            f"| {row['reference_decode_x_copy']:.3f}x | {row['compiled_decode_x_copy']:.3f}x | {red} "
            f"| {row['check_input_x_copy']:.3f}x | {row['fused_encode_x_copy']:.3f}x |"
        )
    if dispatch._broken:
        print("\nbroken paths:", dispatch._broken)
    if args.out:
        meta = {"n": n, "reps": args.reps, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "machine": platform.machine(), "processor": platform.processor(), "broken": dict(dispatch._broken)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
