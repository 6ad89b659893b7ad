"""Where a tailq hook's step goes: a per-stage profile of the DDP hook on loopback (N Gloo ranks, one bucket).

Each rank drives ``tailq.ddp_hook`` with one ``numel``-value bucket per step (as ``tailq bench hook``), after two
warm-up steps, and times every stage by wrapping the library's own functions (exclusive time: a stage called inside
another is subtracted from it):

* statistics — ``local_stats`` (histogram or Σ|g|), the owner's phase-2 statistics included;
* design — ``design_from_stats`` (fit + optimal levels; cached between redesigns);
* round+pack — ``encode_packed`` / ``encode_lanes`` (the owner's requantization included);
* collective: payload / statistics — the hook's collectives by kind (waiting on the other ranks included);
* unpack+decode — ``decode_packed`` / ``decode_mean_packed`` / ``decode_lanes`` / the owner's decode;
* copy-back — the bucket buffer's ``copy_`` (the mean written back into the bucket);
* other — the rest of ``TailqState.process`` (Python, bookkeeping, small tensors), and hand-off — the hook call's
  time on the training thread minus ``process`` (the ordered worker thread's queue).

Every rank's per-step medians are reported for rank 0, beside the bf16 hook timed in the same process right before.
The script only wraps functions that exist, so it profiles older checkouts too (``PYTHONPATH=<old>/src``).

    .venv/bin/python benchmarks/hook_profile.py --world 4 --numel 4194304 --steps 10 --out profile.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

CASES = [("tnq", {"bits": 3, "route": "twophase"}), ("tnq", {"bits": 3, "route": "allgather"}),
         ("tuq", {"bits": 3, "route": "allreduce"})]  # fmt: skip
STAGES = ["statistics", "design", "round+pack", "collective: payload", "collective: statistics", "unpack+decode",
          "copy-back", "other", "hand-off"]  # fmt: skip


class Profiler:
    """Exclusive wall time per stage, on whatever thread the hook runs."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = collections.defaultdict(float)
        self.local = threading.local()

    def _stack(self) -> list[float]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack  # type: ignore[no-any-return]

    def wrap(self, owner: Any, name: str, stage: str | Callable[..., str]) -> None:
        orig = getattr(owner, name, None)
        if orig is None:
            return
        prof = self

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            label = stage(*args, **kwargs) if callable(stage) else stage
            if label == "":
                return orig(*args, **kwargs)
            stack = prof._stack()
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                child = stack.pop()
                prof.acc[label] += dt - child
                if stack:
                    stack[-1] += dt

        setattr(owner, name, wrapped)


def _install(prof: Profiler) -> None:
    from tailq.codec import tq
    from tailq.codec.codebook import Codebook, SnappedCodebook
    from tailq.comm import owner, wire

    for cls in (tq.TruncatedQuantizer,):
        prof.wrap(cls, "local_stats", "statistics")
        prof.wrap(cls, "design_from_stats", "design")
    prof.wrap(Codebook, "encode_packed", "round+pack")
    prof.wrap(SnappedCodebook, "encode_lanes", "round+pack")
    for name in ("decode_packed", "decode_mean_packed"):
        prof.wrap(Codebook, name, "unpack+decode")
    prof.wrap(SnappedCodebook, "decode_lanes", "unpack+decode")
    prof.wrap(owner.OwnerRequantizer, "decode", "unpack+decode")

    def kind(self: Any, t: Any, tag: Any, k: str, *a: Any, **kw: Any) -> str:
        return "collective: payload" if k == "payload" else "collective: statistics"

    for name in ("all_reduce", "all_gather", "all_to_all"):
        prof.wrap(wire.Comm, name, kind)


def _worker(rank: int, world: int, init: str, numel: int, steps: int, threads: int, out: str) -> None:
    import torch.distributed as dist

    import tailq
    from tailq.hooks import LocalBucket, TailqState

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    g = torch.from_numpy((np.random.default_rng(rank).standard_t(3.5, numel) * 1e-3).astype(np.float32))
    prof = Profiler()
    _install(prof)
    process_time: list[float] = []
    orig_process = TailqState.process

    def timed_process(self: Any, bucket: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig_process(self, bucket)
        finally:
            process_time.append(time.perf_counter() - t0)

    TailqState.process = timed_process  # type: ignore[method-assign]

    def run(name: str, opts: dict[str, Any]) -> dict[str, Any]:
        extra = {} if name == "bf16" else {"warmup_steps": 0, "min_bucket": 0, "measure_every": 0}
        state, hook = tailq.ddp_hook(name, **opts, **extra)
        per_step: list[dict[str, float]] = []
        for i in range(steps + 2):
            buf = g.clone()
            # copy-back: the bucket buffer's own copy_ (an instance attribute: a class-wide wrapper would break
            # dynamo's tracing of the compiled kernels, which call Tensor.copy_)
            prof.wrap(buf, "copy_", "copy-back")
            prof.acc.clear()
            process_time.clear()
            dist.barrier()
            t0 = time.perf_counter()
            hook(state, LocalBucket(buf)).wait()  # type: ignore[arg-type]
            total = time.perf_counter() - t0
            if i < 2:
                continue
            row = {s: prof.acc.get(s, 0.0) for s in STAGES[:-2]}
            proc = sum(process_time)
            row["other"] = proc - sum(row.values()) if process_time else 0.0
            row["hand-off"] = total - proc if process_time else 0.0
            row["total"] = total
            per_step.append(row)
        state.close()
        med = {k: 1e3 * statistics.median(r[k] for r in per_step) for k in per_step[0]}
        return {"hook": name, **opts, "ms": med}

    rows = []
    for name, opts in CASES:
        base = run("bf16", {})
        rows.append({**run(name, opts), "bf16_ms": base["ms"]["total"]})
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"world": world, "numel": numel, "steps": steps, "threads": threads, "rows": rows}, fh, indent=1)
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (default cores / world)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.world)
    with tempfile.TemporaryDirectory() as tmp:
        res_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(a.world, os.path.join(tmp, "init"), a.numel, a.steps, threads, res_path),
                 nprocs=a.world)  # fmt: skip
        with open(res_path) as fh:
            res = json.load(fh)
    res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"N = {a.world} Gloo ranks on loopback, d = {a.numel}, {threads} thread(s) per rank; rank 0, median ms/step")
    print("| hook | route | " + " | ".join(STAGES) + " | total | bf16 (adjacent) | × bf16 |")
    print("|---|---|" + "---:|" * (len(STAGES) + 3))
    for r in res["rows"]:
        ms = r["ms"]
        cells = " | ".join(f"{ms[s]:.1f}" for s in STAGES)
        print(f"| {r['hook']}-{r['bits']}b | {r['route']} | {cells} | {ms['total']:.1f} | {r['bf16_ms']:.1f} | "
              f"{ms['total'] / r['bf16_ms']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
