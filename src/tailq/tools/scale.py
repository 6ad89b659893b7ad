"""``tailq bench scale``: every route at N workers on an emulated network — NIC bits, step time against bf16, vNMSE.

Each case is K nodes × L workers (``--workers N``: N × 1, one worker per node; ``--grid KxL``: K nodes of L workers
sharing each node's link), one :class:`~tailq.harness.netem.EmulatedNetwork` of N = K·L ranks on K hosts
(``node_size=L``); in it N processes (Gloo over the emulated links, loopback inside a node; each with torchrun's
``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``GROUP_RANK`` from ``env(rank)``) push one bucket per step through each
hook — PyTorch's bf16 hook, then the compressor on each route of :data:`ROUTES` (any route name the hook accepts) —
and record, per case:

* **NIC bits per coordinate**: bytes the worker's interface sent during the timed steps (the kernel's counter,
  TCP/IP headers and the per-step barrier included), × 8 / (steps × bucket length), mean over ranks; only where a
  node is one worker (L = 1: with L > 1 the workers share one interface and this is ``None``);
* **node NIC bits per coordinate**: the same for each node's interface (read by the node's local rank 0), mean over
  nodes; K × L cases are judged by it (with L = 1 it equals the per-worker figure);
* **hook bits per coordinate**: bytes handed to collectives, from the hook's wire log;
* **ms per step** (median over the timed steps, ranks lined up by a barrier first) and its ratio to the bf16 hook
  measured in the same network right before;
* **vNMSE** of one step against the exact fp32 mean (computed after the timed window, outside the NIC counts), and
  for the two-phase route the error of each phase.

Hierarchical routes (:data:`HIER_ROUTES`: exact inside the node, compressed across nodes) are measured where a case
has several nodes of several workers (K > 1, L > 1); with K = 1 or L = 1 they would run as their flat route.

Next to the measured rows, **modeled** rows for every K × L (measured ones included, so the model's error shows,
and ``--modeled`` N × 1 and ``--modeled-grid`` K × L ones up to 128 × 8): bits leaving each node's NIC per coordinate
from the two-link cost model (:meth:`~tailq.comm.routes.Planner.nic_bits`; one worker per node: the ring traffic)
and time = the cost model's communication on both links + the codec's cost measured in this process (uncontended:
one worker per machine) × the route's passes. The node link is priced at the network's ``node=`` rate, else the
planner's default (100 Gbit/s).

Gradients: per rank, a shared Student-t(3) component plus an independent one (heavy tails, correlated ranks).
On a 2-core machine N processes share two cores, so measured codec time at N = 16 is ~8× what one worker per
machine would see; the table says so.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tailq.comm.network import Network

__all__ = ["HIER_ROUTES", "ROUTES", "modeled_rows", "parse_grid", "routes_for", "run_scale_bench"]

ROUTES = ("allreduce", "allgather", "twophase")
"""Flat routes: measured in every case."""
HIER_ROUTES = ("hier-allreduce", "hier-allgather", "hier-twophase")
"""Hierarchical routes: measured and modeled where a case has K > 1 nodes of L > 1 workers."""


def routes_for(nodes: int, node_size: int) -> tuple[str, ...]:
    """The routes a K × L case measures and models (besides bf16)."""
    return ROUTES + (HIER_ROUTES if nodes > 1 and node_size > 1 else ())


def _cases(name: str, bits: int, nodes: int = 1, node_size: int = 1) -> list[tuple[str, dict[str, Any]]]:
    return [("bf16", {}), *[(name, {"bits": bits, "route": r}) for r in routes_for(nodes, node_size)]]


def _gradient(numel: int, rank: int) -> Any:
    import torch

    common = np.random.default_rng(0).standard_t(3.0, numel)
    own = np.random.default_rng(1 + rank).standard_t(3.0, numel)
    return torch.from_numpy(((common + own) * 1e-3).astype(np.float32))


def _tx_bytes(ifname: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text())
    except OSError:
        return -1


# ---------------------------------------------------------------------------------------------------------
# one worker (runs inside its namespace)
def _worker(spec_path: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    import tailq
    from tailq.hooks import LocalBucket

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # the node structure, as torchrun (and EmulatedNetwork.env) sets it; the hook reads the same variables
    L, local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    node = int(os.environ.get("GROUP_RANK", str(rank // L)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=900))
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    net = Network.parse(spec["net"])
    rows = []
    for numel in spec["numels"]:
        g = _gradient(numel, rank)
        exact = g.clone()
        dist.all_reduce(exact)
        exact /= world
        for hook, opts in _cases(spec["name"], spec["bits"], world // L, L):
            extra = {} if hook == "bf16" else {"warmup_steps": 0, "min_bucket": 0, "network": net}
            state, fn = tailq.ddp_hook(hook, **opts, **extra)

            def step(state: Any = state, fn: Any = fn, g: Any = g) -> Any:
                out = fn(state, LocalBucket(g.clone())).wait()
                return out[0] if isinstance(out, list) else out

            step()  # untimed: kernel compilation, design caches
            dist.barrier()
            tx0 = _tx_bytes(ifname)
            times = []
            for _ in range(spec["steps"]):
                dist.barrier()
                t0 = time.perf_counter()
                out = step()
                times.append(time.perf_counter() - t0)
            dist.barrier()
            tx1 = _tx_bytes(ifname)
            err = float(((out.double() - exact.double()) ** 2).sum() / (exact.double() ** 2).sum())
            row: dict[str, Any] = {"N": world, "K": world // L, "L": L, "numel": numel, "hook": hook,
                                   "route": opts.get("route", "bf16"), "node": node, "local_rank": local,
                                   "bits": opts.get("bits"), "ms": 1e3 * statistics.median(times),
                                   "nic_bits": 8 * (tx1 - tx0) / (spec["steps"] * numel) if tx0 >= 0 else None,
                                   "vnmse": err}
            row["hook_bits"] = state.metrics.wire.bits_per_coord()
            # what the hook's own collectives put on the node's NIC (its wire log: payload and statistics)
            row["hook_node_nic_bits"] = (state.metrics.wire.node_nic_bits_per_coord() if hook != "bf16"
                                         else 8 * 2 * 2 * (world - 1) / world)
            if hook != "bf16":
                lap = state.metrics.seconds
                row["codec_ms"] = 1e3 * (lap["total"] - lap["communicate"]) / (spec["steps"] + 1)
            state.close()
            if opts.get("route") == "twophase":  # one measured step for the error of each phase
                st, f = tailq.ddp_hook(hook, **opts, **extra, measure_every=1)
                f(st, LocalBucket(g.clone())).wait()
                rec = st.metrics.vnmse[0]
                row["vnmse_phase1"], row["vnmse_phase2"] = rec["vnmse_phase1"], rec["vnmse_phase2"]
                st.close()
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, row)
            if rank == 0:
                # every rank of a node read the node's counter between the same barriers: its local rank 0's reading
                node_nic = [r["nic_bits"] for r in gathered if r["local_rank"] == 0 and r["nic_bits"] is not None]
                row["node_nic_bits"] = statistics.mean(node_nic) if node_nic else None
                row["nic_bits"] = row["node_nic_bits"] if L == 1 else None  # a worker's own interface: L = 1 only
                row["ms"] = max(r["ms"] for r in gathered)  # the step ends when the slowest rank has the mean
                for key in ("node", "local_rank"):
                    del row[key]
                rows.append(row)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(rows))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# the model
def modeled_rows(name: str, bits: int, net: Network, shapes: list[tuple[int, int]],
                 numels: list[int]) -> list[dict[str, Any]]:
    """The cost model's rows for each K × L shape: bits leaving each node's NIC per coordinate and ms per step
    (communication on both links + measured codec), per route, with the planner's pick marked."""
    from tailq.codec import compressor
    from tailq.comm.families import family_for
    from tailq.comm.routes import PASSTHROUGH, Planner
    from tailq.comm.topology import Shape
    from tailq.hooks.tailq_hook import measure_codec_cost

    comp = compressor(name, bits=bits)
    family = family_for(comp, fine_bits=2, keep_own=False)
    cost = measure_codec_cost(comp, family, "cpu", 2)
    rows = []
    for k, L in shapes:
        planner = Planner(family, k * L, net, cost, passthrough=True, shape=Shape(k, L))
        for numel in numels:
            for route in (PASSTHROUGH, *routes_for(k, L)):
                if route not in planner.routes and route != PASSTHROUGH:
                    continue
                rows.append({"N": k * L, "K": k, "L": L, "numel": numel,
                             "route": "bf16" if route == PASSTHROUGH else route,
                             "ms": 1e3 * planner.seconds(route, numel), "ring_bits": planner.nic_bits(route, numel),
                             "codec_ms": 1e3 * planner.codec_seconds(route, numel), "modeled": True,
                             "planner_pick": planner.plan(numel) == route})
    return rows


# ---------------------------------------------------------------------------------------------------------
# the parent
def parse_grid(text: str, *, modeled: bool = False) -> tuple[int, int]:
    """``"KxL"`` (K nodes of L workers each, e.g. ``2x4``) as ``(K, L)``; ``ValueError`` naming the accepted form.
    ``modeled``: a ``--modeled-grid`` shape (up to 2^20 workers; nothing is launched)."""
    opt, high = ("--modeled-grid", MAX_MODELED) if modeled else ("--grid", MAX_WORKERS)
    k, sep, l_ = text.strip().lower().partition("x")
    if not (sep and k.isdigit() and l_.isdigit() and int(k) >= 1 and int(l_) >= 1
            and MIN_WORKERS <= int(k) * int(l_) <= high):
        raise ValueError(f"{opt} must be KxL (K nodes x L workers per node, e.g. 2x4) with {MIN_WORKERS} <= K*L <= "
                         f"{high}; got {text!r}")
    return int(k), int(l_)


MAX_MODELED = 2**20
"""Workers of one modeled shape."""
MIN_WORKERS, MAX_WORKERS = 2, 64
"""Workers of one measured case (``--workers``, K·L of ``--grid``)."""


def run_scale_bench(net: Network, workers: list[int] | None, numels: list[int], *, name: str = "tnq", bits: int = 3,
                    steps: int = 3, modeled: list[int] | None = None, json_out: str | None = None,
                    timeout_s: float = 1800.0, grid: list[tuple[int, int]] | None = None,
                    modeled_grid: list[tuple[int, int]] | None = None) -> int:
    """Measure every case — ``workers`` (N × 1 each) then ``grid`` (K × L each) — beside the cost model."""
    from rich.console import Console

    from tailq.harness.launch import reap
    from tailq.harness.netem import EmulatedNetwork

    con = Console(width=None if sys.stdout.isatty() else 160)
    measured: list[dict[str, Any]] = []
    cases = list(dict.fromkeys([(n, 1) for n in workers or []] + list(grid or [])))  # in order, each once
    for k, L in cases:
        n = k * L
        with tempfile.TemporaryDirectory() as tmp, EmulatedNetwork(n, net, node_size=L, tag=f"scale{k}x{L}") as emu:
            spec: dict[str, Any] = {"net": net.as_arg(), "numels": numels, "name": name, "bits": bits, "steps": steps,
                    "out": os.path.join(tmp, "rows.json")}
            spec_path = os.path.join(tmp, "spec.json")
            Path(spec_path).write_text(json.dumps(spec))
            logs = [open(os.path.join(tmp, f"rank{r}.log"), "w") for r in range(n)]  # noqa: SIM115
            t0 = time.perf_counter()
            procs = [subprocess.Popen([*emu.command_prefix(r), sys.executable, "-m", "tailq.tools.scale", spec_path],
                                      env={**os.environ, **emu.env(r), "OMP_NUM_THREADS": "1"},
                                      stdout=logs[r], stderr=subprocess.STDOUT) for r in range(n)]
            try:
                for p in procs:
                    p.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
            finally:
                reap(procs, logs)
            if any(p.returncode for p in procs):
                tail = Path(os.path.join(tmp, "rank0.log")).read_text()[-3000:]
                raise RuntimeError(f"bench scale: {k} x {L} (N = {n}) failed (exit codes "
                                   f"{[p.returncode for p in procs]}):\n{tail}")
            rows = json.loads(Path(spec["out"]).read_text())
        bf16 = {r["numel"]: r["ms"] for r in rows if r["hook"] == "bf16"}
        for r in rows:
            r["x_bf16"] = r["ms"] / bf16[r["numel"]]
        measured += rows
        con.print(f"{k} x {L} (N = {n}): done in {time.perf_counter() - t0:.0f} s")
    shapes = list(dict.fromkeys([*cases, *[(n, 1) for n in modeled or []], *(modeled_grid or [])]))
    model = modeled_rows(name, bits, net, sorted(shapes, key=lambda s: (s[0] * s[1], s[1])), numels)
    report = {"network": net.summary(), "compressor": name, "bits": bits, "steps": steps,
              "cases": [[k, L] for k, L in cases], "measured": measured, "modeled": model,
              "cpu_count": os.cpu_count()}
    _print(con, report)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
        con.print(f"wrote {json_out}")
    return 0


def _print(con: Any, report: dict[str, Any]) -> None:
    model = {(r.get("K", r["N"]), r.get("L", 1), r["numel"], r["route"]): r for r in report["modeled"]}
    con.print(f"{report['compressor']} {report['bits']}-bit on {report['network']['describe']}; measured on "
              f"{report['cpu_count']} cores shared by all N workers; K x L = K nodes of L workers sharing each node's "
              "link; MODELED rows: two-link cost model + this machine's uncontended codec cost")
    con.print("| K x L | N | values | route | NIC bits/coord (worker) | NIC bits/coord (node) | hook bits/coord | "
              "ms/step | × bf16 | vNMSE (phase 1 / 2) | modeled node NIC bits | modeled ms | modeled × bf16 |")
    con.print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    measured = {(r.get("K", r["N"]), r.get("L", 1), r["numel"], r["route"]): r for r in report["measured"]}
    shapes = sorted({(k * L, k, L, numel) for k, L, numel, _ in [*measured, *model]}, key=lambda s: (s[0], s[2], s[3]))
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for n, k, L, numel in shapes:
        routes = ["bf16", *routes_for(k, L)]
        routes += sorted({r for kk, ll, nu, r in [*measured, *model] if (kk, ll, nu) == (k, L, numel)} - set(routes))
        for route in routes:
            m, mod = measured.get((k, L, numel, route)), model.get((k, L, numel, route))
            mb = model.get((k, L, numel, "bf16"))
            if m is None and mod is None:
                continue
            pick = " (plan)" if mod and mod["planner_pick"] else ""
            if m is None:
                cells = ["—"] * 6
            else:
                ph = (f" ({m['vnmse_phase1']:.3f} / {m['vnmse_phase2']:.3f})" if "vnmse_phase1" in m else "")
                cells = [fmt(m["nic_bits"], ".2f"), fmt(m.get("node_nic_bits", m["nic_bits"]), ".2f"),
                         f"{m['hook_bits']:.2f}", f"{m['ms']:.0f}", f"{m['x_bf16']:.2f}",
                         "—" if route == "bf16" else f"{m['vnmse']:.4f}{ph}"]
            mcells = (["—"] * 3 if mod is None or mb is None else
                      [f"{mod['ring_bits']:.2f}", f"{mod['ms']:.0f}", f"{mod['ms'] / mb['ms']:.2f}"])
            con.print(f"| {k} x {L} | {n} | {numel:,} | {route}{pick} | " + " | ".join(cells + mcells) + " |")


if __name__ == "__main__":
    _worker(sys.argv[1])
