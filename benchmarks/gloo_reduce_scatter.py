"""Gloo's reduce-scatter against its all-reduce and all-to-all on the same tensor: why ``--fsdp`` has ``reduce=a2a``.

FSDP2 reduce-scatters gradients with ``dist.reduce_scatter_single``. On Gloo that collective is carried out as an
all-reduce of the whole tensor followed by a copy of this rank's shard, so it moves an all-reduce's traffic,
2 (N − 1)/N · d values per rank, where a reduce-scatter needs (N − 1)/N · d (what an ``all_to_all_single`` of the
N chunks moves, and what NCCL's ring reduce-scatter moves). Timed here in one run, best of ``--repeat``, with the
three collectives interleaved. Under ``torchrun`` on loopback; with ``--spawn N`` the N ranks run in network
namespaces rate-limited to ``--net`` (default 100mbit; root and iproute2).

    .venv/bin/torchrun --nproc_per_node 2 benchmarks/gloo_reduce_scatter.py --numel 16777216
    .venv/bin/python benchmarks/gloo_reduce_scatter.py --spawn 4 --net 100mbit --numel 4194304 \\
        --out benchmarks/results/gloo_reduce_scatter.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def measure(numel: int, repeat: int) -> dict[str, float]:
    n = dist.get_world_size()
    x = torch.randn(numel)
    shard = torch.empty(numel // n)
    y = torch.empty_like(x)
    ops = {
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, x),
        "all_reduce": lambda: dist.all_reduce(x.clone()),
        "all_to_all": lambda: dist.all_to_all_single(y, x),
    }
    best = {k: float("inf") for k in ops}
    for _ in range(repeat + 1):  # the first round warms up
        for k, f in ops.items():
            dist.barrier()
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--spawn", type=int, help="start this many ranks here (else: run under torchrun)")
    ap.add_argument("--net", help="with --spawn: emulated RATE[,DELAY] (root), else loopback")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.spawn:
        import subprocess

        from tailq.comm.network import Network
        from tailq.harness.netem import EmulatedNetwork

        cmd = [sys.executable, os.path.abspath(__file__), "--numel", str(a.numel), "--repeat", str(a.repeat)]
        if a.out:
            cmd += ["--out", os.path.abspath(a.out)]
        with EmulatedNetwork(a.spawn, Network.parse(a.net or "100mbit"), tag="gloors") as emu:
            procs = [subprocess.Popen([*emu.command_prefix(r), *cmd],
                                      env={**os.environ, **emu.env(r), "OMP_NUM_THREADS": "1"})
                     for r in range(a.spawn)]
            rc = max(p.wait(timeout=1800) for p in procs)
        sys.exit(rc)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    best = measure(a.numel, a.repeat)
    if dist.get_rank() == 0:
        n = dist.get_world_size()
        row = {"workers": n, "numel": a.numel, "ms": {k: 1e3 * v for k, v in best.items()},
               "reduce_scatter_over_all_reduce": best["reduce_scatter"] / best["all_reduce"],
               "all_to_all_over_reduce_scatter": best["all_to_all"] / best["reduce_scatter"]}
        print(json.dumps(row, indent=1))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(row, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
