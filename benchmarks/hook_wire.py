"""Wire bits per coordinate (counted) vs the cost model, and hook time vs the bf16 hook, on real Gloo ranks.

    .venv/bin/python benchmarks/hook_wire.py [--world 4] [--numel 4194304] [--steps 3] [--json out.json]

Each rank hooks one bucket of ``numel`` heavy-tailed float32 values (Student-t, 3.5 dof) for ``steps`` steps
on loopback Gloo. "measured" is 8 × (bytes handed to collectives: payload + statistics + indices) / numel,
from the hook's own wire log; "model" is the cost model's prediction (lane plan or dense packing + the size of
the statistics vector); "ring" is the per-worker traffic of a ring implementation. Times are medians over the
steps after one warm-up, from rank 0, and include encode, collectives and decode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tailq
from tailq.hooks.tailq_hook import TailqState

ROUTES = ("allreduce", "allgather")
CASES: list[tuple[str, dict[str, Any]]] = [
    ("fp32", {}), ("bf16", {}), ("fp16", {}), ("powersgd", {"matrix_approximation_rank": 1, "start_powerSGD_iter": 2}),
    *[(n, {"bits": b, "route": r}) for n in ("tuq", "tnq", "tbq") for b in (2, 3, 4) for r in ROUTES],
    *[("single-scale", {"bits": b, "route": r}) for b in (2, 3, 4) for r in ROUTES],
    ("multi-scale", {"bits": 4, "route": "allreduce"}), ("multi-scale", {"bits": 4, "route": "allgather"}),
    ("qsgd", {"bits": 4}), ("nuqsgd", {"bits": 4}), ("terngrad", {}), ("efsign", {}), ("topk", {"ratio": 0.01}),
]


class Bucket:
    def __init__(self, buf: torch.Tensor, side: int) -> None:
        self.buf, self.side = buf, side

    def buffer(self) -> torch.Tensor:
        return self.buf

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def gradients(self) -> list[torch.Tensor]:  # one square matrix, so PowerSGD compresses it
        return [self.buf.view(self.side, -1)]


def worker(rank: int, world: int, init: str, numel: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    g = torch.from_numpy((np.random.default_rng(rank).standard_t(3.5, numel) * 1e-3).astype(np.float32))
    side = int(round(numel**0.5))
    rows = []
    for name, opts in CASES:
        extra = {} if name in tailq.hooks.BUILTINS else {"warmup_steps": 0, "min_bucket": 0}
        state, hook = tailq.ddp_hook(name, **opts, **extra)
        times = []
        for _ in range(steps + 2):  # PowerSGD compresses from its 3rd step on
            dist.barrier()
            t0 = time.perf_counter()
            res = hook(state, Bucket(g.clone(), side)).wait()
            times.append(time.perf_counter() - t0)
        del res
        last = state.step - 1  # steady state: the last step (PowerSGD's first two steps are uncompressed)
        row = {"hook": name, **opts, "ms": 1e3 * statistics.median(times[2:]),
               "measured": state.metrics.wire.step_bits_per_coord(last)}
        ratio = 2 * (world - 1) / world  # ring all-reduce traffic per handed byte
        if isinstance(state, TailqState):
            route = state.metrics.last[0]["route"]
            row["ring"] = row["measured"] * (ratio if route == "allreduce" else world - 1)
            stats_bytes = 0
            if state.family.uses_stats:
                own = state.family.local_stats(g)
                stats_bytes = (own.numel() + 1) * own.element_size()
            else:
                stats_bytes = 8  # the non-finite flag
            index_bytes = state.comp.n_indices(numel) if name == "multi-scale" else 0
            row["model"] = 8 * (state.planner.payload_bytes(route, numel) + stats_bytes + index_bytes) / numel
            row["route"] = route
        else:
            row["ring"] = row["measured"] * ratio
            # PowerSGD rank r on one side×side matrix all-reduces P (side×r) and Q (side×r) in fp32
            rank_r = opts.get("matrix_approximation_rank", 1)
            row["model"] = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0}.get(name, 32 * 2 * side * rank_r / numel)
            row["route"] = "allreduce"
        rows.append(row)
        state.close()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(rows, fh)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(worker, args=(a.world, os.path.join(tmp, "init"), a.numel, a.steps, out), nprocs=a.world)
        rows = json.load(open(out))
    bf16 = next(r["ms"] for r in rows if r["hook"] == "bf16")
    print(f"N = {a.world} ranks, d = {a.numel}, loopback Gloo, torch {torch.__version__}, {sys.platform}")
    print("| hook | bits | route | measured bits/coord | model | diff | ring traffic bits/coord | ms/step | × bf16 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        diff = 100 * (r["measured"] - r["model"]) / r["model"]
        print(f"| {r['hook']} | {r.get('bits', '—')} | {r['route']} | {r['measured']:.3f} | {r['model']:.3f} | "
              f"{diff:+.2f}% | {r['ring']:.3f} | {r['ms']:.0f} | {r['ms'] / bf16:.2f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"world": a.world, "numel": a.numel, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
