"""The two-phase route's error by phase against ``gather_bits``: the evidence behind its default (bits + 2).

One process runs the route's arithmetic for N ranks without process groups — each rank's dense codes on the
shared codebook (agreed statistics summed over ranks), the fp32 mean of their decodes per shard, the owner's
requantization (:class:`tailq.comm.owner.OwnerRequantizer`, the code the route runs) — and reports per
(compressor, bits, N, gather_bits): vNMSE of phase 1 (its exact mean against the true mean), of the route's
output, and ring bits per coordinate from the cost model. Also the variant that lets phase 2 clip again (the
compressor's own truncated design on the mean shard, not stretched to its max) to show why the route does not.

Gradients: per rank a shared Student-t(3) component plus an independent one, ×1e-3 (as ``tailq bench scale``).

    .venv/bin/python benchmarks/twophase_gather_bits.py --out benchmarks/results/twophase_gather_bits.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from tailq.codec import compressor
from tailq.comm.families import family_for
from tailq.comm.network import ring_traffic_bytes
from tailq.comm.owner import OwnerRequantizer
from tailq.comm.routes import ROUTES, shard_numel
from tailq.kernels import RandKey


def gradients(numel: int, n: int) -> list[torch.Tensor]:
    common = np.random.default_rng(0).standard_t(3.0, numel)
    return [torch.from_numpy(((common + np.random.default_rng(1 + r).standard_t(3.0, numel)) * 1e-3)
                             .astype(np.float32)) for r in range(n)]


def vnmse(a: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((a.double() - exact.double()) ** 2).sum() / (exact.double() ** 2).sum())


def run(name: str, bits: int, n: int, numel: int, gather_bits: list[int]) -> list[dict[str, object]]:
    comp = compressor(name, bits=bits)
    gs = gradients(numel, n)
    exact = sum(g.double() for g in gs) / n
    cb = comp.codebook(sum(comp.local_stats(g) for g in gs))
    m = shard_numel(numel, n)
    pad = n * m - numel
    mean1 = torch.zeros(n * m, dtype=torch.float32)
    for r, g in enumerate(gs):
        x = torch.nn.functional.pad(g, (0, pad))
        mean1 += cb.decode_packed(cb.encode_packed(x, RandKey(0, r, 0, 0), bits), bits, n * m)
    mean1 /= n
    rows = []
    for gb in gather_bits:
        for clip in (False, True):
            owner = OwnerRequantizer(comp, gb, owner_feedback=False, redesign_every=1)
            out = torch.empty(n * m, dtype=torch.float32)
            for r in range(n):
                shard = mean1[r * m : (r + 1) * m]
                valid = max(0, min(m, numel - r * m))
                if clip:  # the compressor's own truncated design on the shard, applied as is
                    c2 = owner.comp
                    cb2 = c2.codebook(c2.local_stats(shard[:valid]))
                    out[r * m : (r + 1) * m] = cb2.decode_packed(
                        cb2.encode_packed(shard, RandKey(0, r + (1 << 40), 0, 0), gb), gb, m)
                else:
                    payload = owner.requantize(f"b/{r}", shard, valid, RandKey(0, r + (1 << 40), 0, 0))
                    owner.decode(payload, m, out[r * m : (r + 1) * m])
            fam = family_for(comp, fine_bits=2, keep_own=False, gather_bits=gb)
            traffic = sum(ring_traffic_bytes(c, b, n) for c, b in ROUTES["twophase"].phases(numel, n, fam))
            rows.append({"compressor": name, "bits": bits, "N": n, "gather_bits": gb,
                         "phase2": "clipped again" if clip else "stretched (the route)",
                         "vnmse_phase1": vnmse(mean1[:numel], exact), "vnmse": vnmse(out[:numel], exact),
                         "ring_bits": 8 * traffic / numel})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 18)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in ("tuq", "tnq", "tbq"):
        for bits in (2, 3, 4):
            for n in (4, 16):
                rows += run(name, bits, n, args.numel, sorted({bits, bits + 1, bits + 2, min(bits + 3, 8), 8}))
    print("| compressor | bits | N | gather_bits | phase 2 | vNMSE phase 1 | vNMSE | × phase 1 | ring bits/coord |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['compressor']} | {r['bits']} | {r['N']} | {r['gather_bits']} | {r['phase2']} | "
              f"{r['vnmse_phase1']:.4f} | {r['vnmse']:.4f} | {r['vnmse'] / r['vnmse_phase1']:.3f} | "
              f"{r['ring_bits']:.2f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"numel": args.numel, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
